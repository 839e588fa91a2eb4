"""The layer_mi command end to end on tiny checkpoints (read by fairseq's own loader), and its errors."""
import csv
import json

import joblib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.cluster import KMeans

from fairseq_mamba.analysis import layer_features as lf
from fairseq_mamba.analysis import layer_mi

from conftest import write_tiny_dataset

# cheap critics: this tests the plumbing; the estimators' accuracy is tests/test_mutual_information.py's job
FAST = dict(pca=8, hidden=16, embed=16, batch_size=64, max_steps=40, eval_every=10)


def write_checkpoint(path, model_name, data_dir):
    """A random-init 2-layer model saved the way fairseq's trainer saves one."""
    import fairseq_mamba  # noqa: F401  (registers mamba_hubert)
    from fairseq import tasks

    cfg = OmegaConf.create({
        "task": {"_name": "hubert_pretraining", "data": str(data_dir), "label_dir": str(data_dir), "labels": ["km"],
                 "label_rate": 100, "normalize": True},
        "model": {"_name": model_name, "label_rate": 100, "extractor_mode": "layer_norm", "encoder_layers": 2,
                  "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
                  "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", "conv_pos": 16,
                  "conv_pos_groups": 4, "final_dim": 16}})
    torch.manual_seed(0)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "hubert", "optimizer_name": "adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_tiny_dataset(tmp_path_factory.mktemp("layer_mi"), n_train=6, n_valid=1)
    ckpts = [write_checkpoint(root / f"{m}.pt", m, root) for m in ("mamba_hubert", "hubert")]
    utts = lf.read_manifest(str(root / "train.tsv"))
    mfcc = np.concatenate(lf.read_mfcc(utts, lf.FrameGeometry(((400, 320),)))).astype(np.float64)
    joblib.dump(KMeans(4, n_init=1, random_state=0).fit(mfcc), root / "km.bin")
    return root, ckpts


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(layer_mi, "ESTIMATORS", {t: ("infonce", dict(FAST)) for t in layer_mi.TARGETS})


def args(root, out, *checkpoints, extra=()):
    return [*checkpoints, "--manifest", str(root / "train.tsv"), "--out", str(out), "--kmeans", str(root / "km.bin"),
            "--phones", str(root / "train.km"), *extra]


def test_command_writes_csv_json_and_plot(setup, fast, tmp_path):
    root, (mamba, hubert) = setup
    result = layer_mi.main(args(root, tmp_path, f"mamba={mamba}", hubert,
                                extra=["--repeats", "2", "--layer0-codes", "8"]))
    frames = sum(lf.FrameGeometry(((400, 320),)).n_frames(u.n_samples) for u in lf.read_manifest(str(root / "train.tsv")))
    saved = json.loads((tmp_path / "layer_mi.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["models"]) == ["mamba", "hubert"] and saved["frames"] == frames
    assert [m["model"] for m in saved["models"].values()] == ["mamba_hubert", "hubert"]
    rows = list(csv.DictReader(open(tmp_path / "layer_mi.csv")))
    assert len(rows) == 2 * 3 * 4
    for name, entry in saved["models"].items():
        assert entry["layers"] == 2 and entry["frames"] == frames
        for target in layer_mi.DEFAULT_TARGETS:
            assert len(entry[target]) == len(entry["std"][target]) == 3
            assert all(s > 0 for s in entry["std"][target])  # two repeats, two splits and critics
            mine = [r for r in rows if r["model"] == name and r["target"] == target]
            assert [float(r["mi_nats"]) for r in mine] == pytest.approx(entry[target], abs=1e-4)
            assert {r["method"] for r in mine} == {"infonce"} and {r["pca"] for r in mine} == {"8"}
        assert all(float(r["mi_nats"]) <= float(r["ceiling_nats"]) for r in rows)  # InfoNCE <= log N_heldout
        # layer0's target: the model's own 8-cell layer-0 codebook, its entropy and the permuted-code null
        assert entry["layer0_codes"] == 8 and 1.0 < entry["layer0_entropy"] <= np.log(8) + 1e-4
        assert {r["entropy_nats"] for r in rows if r["model"] == name and r["target"] == "layer0"} == {
            f"{entry['layer0_entropy']:.4f}"}
        assert max(entry["layer0"]) <= entry["layer0_entropy"] + 0.05 and abs(entry["layer0_null"]) < 0.1
    for target in ("units", "phones"):
        assert {r["entropy_nats"] for r in rows if r["target"] == target} == {
            f"{saved['targets'][target]['entropy_nats']:.4f}"}
    assert {r["entropy_nats"] for r in rows if r["target"] == "mfcc"} == {""}
    units, phones = saved["targets"]["units"], saved["targets"]["phones"]
    assert units["classes"] <= 4 and 0 < units["entropy_nats"] <= np.log(4) + 0.01
    assert phones["classes"] == len({t for line in open(root / "train.km") for t in line.split()})
    assert (tmp_path / "layer_mi.png").stat().st_size > 20000


def test_worker_processes_give_the_same_numbers():
    """--jobs N runs the same seeded estimates in spawned processes: the numbers do not change.
    (Slowest test here, 5-25 s: each spawned worker imports torch and fairseq.)"""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    groups = torch.arange(400) // 40
    tasks = [(x, x[:, :3] + k * torch.randn(400, 3, generator=g), "infonce", 0, 1, groups, FAST) for k in (0.1, 1, 10)]
    inline = [est.value for est, _ in layer_mi.run_all(tasks, None)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        assert [est.value for est, _ in layer_mi.run_all(tasks, pool)] == inline
    assert inline[0] > inline[1] > inline[2]  # less noise, more information


def test_errors_name_the_problem(setup, tmp_path, capsys):
    root, (mamba, _) = setup
    with pytest.raises(ValueError, match=r"checkpoint .*nope.pt does not exist"):
        layer_mi.main(args(root, tmp_path, mamba, str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match=r"two checkpoints are named 'mamba_hubert'; name them: NAME=PATH"):
        layer_mi.main(args(root, tmp_path, mamba, mamba))
    lines = open(root / "train.km").read().splitlines()
    bad = tmp_path / "bad.phn"
    bad.write_text("\n".join(lines[:4] + [lines[4] + " 1 1 1 1 1"] + lines[5:]) + "\n")
    with pytest.raises(SystemExit, match=rf"layer_mi: error: {bad} line 5 \(train4.wav, manifest line 6\): "
                                         r"\d+ frames, but \d+ samples give \d+ frames.*regenerate"):
        layer_mi.cli([mamba, "--manifest", str(root / "train.tsv"), "--out", str(tmp_path), "--phones", str(bad)])


def test_checkpoint_loads_when_its_label_dictionary_is_gone(setup, tmp_path):
    """A moved run or a released HuBERT: the dictionary fairseq's task wants is not there."""
    root, _ = setup
    moved = tmp_path / "labels"
    moved.mkdir()
    (moved / "dict.km.txt").write_text((root / "dict.km.txt").read_text())
    ckpt = write_checkpoint(tmp_path / "moved.pt", "hubert", moved)
    (moved / "dict.km.txt").unlink()
    model, name, normalize = lf.load_checkpoint(ckpt)
    reference = torch.load(ckpt, weights_only=False)["model"]
    assert name == "hubert" and normalize
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
