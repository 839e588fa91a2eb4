"""Stage 09 on every checkpoint kind (issue #14): fine-tuned hubert_ctc, hubert_ctc_head (encoder then
head layers on one axis), the reconstruction model, and the paper's estimator as a target."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from fairseq_mamba.analysis import layer_features as lf
from fairseq_mamba.analysis import layer_mi

from conftest import REPO, write_tiny_dataset
from test_ctc_head import add_letter_targets
from test_layer_mi import FAST, write_checkpoint
from test_reconstruction import build as build_enhancer

CHEAP_PAPER = dict(pca=4, steps=5, hidden=8, embed=4, max_utterances=2)


def save(model, cfg, path):
    """A model saved the way fairseq's trainer saves one (cfg + weights), for load_model_ensemble_and_task."""
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "ctc", "optimizer_name": "adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    return str(path)


def finetuned(root, pretrained, path, config, **fields):
    """A hubert_ctc / hubert_ctc_head checkpoint built from examples/finetune/CONFIG.yaml on ``pretrained``."""
    import fairseq_mamba  # noqa: F401
    from fairseq import tasks

    cfg = OmegaConf.load(REPO / "examples" / "finetune" / f"{config}.yaml")
    cfg.task.data = cfg.task.label_dir = str(root)
    cfg.model.update(w2v_path=pretrained, normalize=True, data=str(root), **fields)
    torch.manual_seed(0)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    return save(model, OmegaConf.create({"task": cfg.task, "model": cfg.model}), path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = add_letter_targets(write_tiny_dataset(tmp_path_factory.mktemp("mi_models"), n_train=4, n_valid=1))
    pre = write_checkpoint(root / "pre.pt", "mamba_hubert", root)
    cfg, _, enhancer = build_enhancer(root, "hubert")
    return root, {"pre": pre, "alone": finetuned(root, pre, root / "alone.pt", "mamba_hubert_tiny_cpu"),
                  "head": finetuned(root, pre, root / "head.pt", "head_tiny_cpu", head_type="conformer",
                                    head_layers=2),
                  "recon": save(enhancer, cfg, root / "recon.pt")}


def waves(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(length), generator=gen) for length in torch.randint(6000, 12000, (n,), generator=gen)]


def test_fine_tuned_models_are_read_at_their_encoder_and_head(checkpoints):
    _, ckpts = checkpoints
    pre = lf.extract_layers(lf.load_checkpoint(ckpts["pre"])[0], waves())
    for kind, n_head in (("alone", 0), ("head", 2)):
        model, name, normalize = lf.load_checkpoint(ckpts[kind])
        assert name == ("hubert_ctc" if kind == "alone" else "hubert_ctc_head") and normalize
        assert lf.head_layers(model) == n_head
        layers = lf.extract_layers(model, waves(), batch_seconds=10)  # one padded batch
        assert len(layers) == 1 + 2 + n_head and layers[-1].shape[0] == pre[0].shape[0]
        for ours, theirs in zip(layers, pre):  # the fine-tuning started from the pre-trained weights
            torch.testing.assert_close(ours, theirs)
        solo = lf.extract_layers(model, waves(), batch_seconds=0)
        for a, b in zip(layers, solo):  # a padded batch gives each utterance its solo features, head included
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_command_on_every_kind_with_the_paper_estimator(checkpoints, monkeypatch, tmp_path):
    root, ckpts = checkpoints
    monkeypatch.setattr(layer_mi, "ESTIMATORS", {**{t: ("infonce", dict(FAST)) for t in layer_mi.DEFAULT_TARGETS},
                                                  "input": ("mine_utterance", CHEAP_PAPER)})
    result = layer_mi.main([f"{k}={v}" for k, v in ckpts.items()] + [
        "--manifest", str(root / "train.tsv"), "--out", str(tmp_path), "--targets", "layer0", "input",
        "--layer0-codes", "4", "--repeats", "1"])
    models = json.loads((tmp_path / "layer_mi.json").read_text())["models"]
    assert list(models) == ["pre", "alone", "head", "recon"]
    expected = {"pre": (2, 0, "mamba_hubert"), "alone": (2, 0, "hubert_ctc"), "head": (2, 2, "hubert_ctc_head"),
                "recon": (2, 0, "hubert_enhancer")}
    for name, (n_enc, n_head, model) in expected.items():
        entry = models[name]
        assert (entry["encoder_layers"], entry["head_layers"], entry["model"]) == (n_enc, n_head, model)
        assert entry["layers"] == n_enc + n_head
        for target in ("layer0", "input"):
            assert len(entry[target]) == len(entry["std"][target]) == n_enc + n_head + 1
        assert "mfcc" not in entry and "layer0_null" in entry
    assert set(result["targets"]) == {"layer0", "input"}
    assert result["estimators"]["input"]["method"] == "mine_utterance"
