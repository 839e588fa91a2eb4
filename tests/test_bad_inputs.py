"""Hostile inputs (issue #6, points 1-2): every bad audio file, label file and dictionary stops the
pipeline stage or training before any work, with one error naming the file, the manifest line and
the fix; FAIRSEQ_MAMBA_BAD_LINES=skip skips bad lines instead and counts them in the log. (Bad
configs: test_bad_config.py.)

The tiny dataset (conftest.write_tiny_dataset) has 6 train utterances; the fault is put into the
third (manifest line 4: the first line of a manifest is the audio root).
"""
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import joblib
import numpy as np
import pytest
import soundfile as sf
import torch

from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask
from fairseq_mamba.checks import data_checks
from fairseq_mamba.checks.data_checks import BAD_LINES_ENV, DataError, check_task_split

from conftest import BIN, REPO, subprocess_env, write_tiny_dataset

LINE = 4  # manifest line of the faulty utterance (index 2)


def _rewrite(tsv: Path, index: int, rel=None, samples=None):
    """Change the relative path and/or sample count of utterance ``index`` in a manifest."""
    lines = tsv.read_text().splitlines()
    old_rel, old_n = lines[index + 1].split("\t")
    lines[index + 1] = f"{rel or old_rel}\t{old_n if samples is None else samples}"
    tsv.write_text("\n".join(lines) + "\n")


def _flac(wav: Path, mangle) -> str:
    """Re-encode ``wav`` as FLAC, pass its bytes through ``mangle``; returns the new relative name."""
    x, sr = sf.read(wav)
    flac = wav.with_suffix(".flac")
    sf.write(flac, x, sr)
    flac.write_bytes(mangle(flac.read_bytes()))
    return f"wav/{flac.name}"


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)) + data[middle + 2000:]


def _float_wav_with(wav: Path, value):
    x, sr = sf.read(wav)
    x[100] = value
    sf.write(wav, x, sr, subtype="FLOAT")


# fault -> (make it: (wav path, manifest, utterance index) -> None, what the error must say)
AUDIO_FAULTS = {
    "missing": (lambda wav, tsv, i: wav.unlink(), "does not exist"),
    "not_audio": (lambda wav, tsv, i: wav.write_text("not audio\n" * 50), "cannot be read as audio"),
    "corrupt": (lambda wav, tsv, i: _rewrite(tsv, i, rel=_flac(wav, _corrupt)), "is corrupt or truncated"),
    "truncated_flac": (lambda wav, tsv, i: _rewrite(tsv, i, rel=_flac(wav, lambda b: b[: len(b) // 2])),
                       "is corrupt or truncated"),
    "truncated_wav": (lambda wav, tsv, i: wav.write_bytes(wav.read_bytes()[:20000]),
                      "samples but the manifest says"),
    "zero_samples": (lambda wav, tsv, i: (sf.write(wav, np.zeros(0), 16000), _rewrite(tsv, i, samples=0)),
                     "has no samples"),
    "stereo": (lambda wav, tsv, i: sf.write(wav, np.stack([sf.read(wav)[0]] * 2, 1), 16000),
               "has 2 channels"),
    "sample_rate": (lambda wav, tsv, i: sf.write(wav, sf.read(wav)[0], 44100), "is 44100 Hz"),
    "nan": (lambda wav, tsv, i: _float_wav_with(wav, np.nan), "NaN/inf samples"),
    "inf": (lambda wav, tsv, i: _float_wav_with(wav, np.inf), "NaN/inf samples"),
    "wrong_count": (lambda wav, tsv, i: _rewrite(tsv, i, samples=12345), "but the manifest says 12345"),
}


def dataset_with(tmp_path, *faults):
    """The tiny dataset with ``faults`` in train utterances 2, 3, ...; -> (root, their wav paths)."""
    root = write_tiny_dataset(tmp_path / "data")
    paths = []
    for index, fault in enumerate(faults, start=2):
        wav = root / "wav" / f"train{index}.wav"
        AUDIO_FAULTS[fault][0](wav, root / "train.tsv", index)
        paths.append(wav)
    return root, paths


def task_cfg(root, **overrides):
    return HubertPretrainingConfig(data=str(root), label_dir=str(root), labels=["km"], label_rate=100.0,
                                   sample_rate=16000, **overrides)


@pytest.mark.parametrize("fault", sorted(AUDIO_FAULTS))
def test_bad_audio_is_named_with_its_manifest_line_and_fix(fault, tmp_path, monkeypatch, caplog):
    root, (wav,) = dataset_with(tmp_path, fault)
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError) as err:
        check_task_split(task_cfg(root), "train")
    message = str(err.value)
    assert f"{root / 'train.tsv'} line {LINE}:" in message and wav.stem in message
    assert AUDIO_FAULTS[fault][1] in message and "Fix: " in message and BAD_LINES_ENV in message
    # the explicit option: the line is skipped and counted instead
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    with caplog.at_level(logging.WARNING, logger="fairseq_mamba.checks.data_checks"):
        _, bad = check_task_split(task_cfg(root), "train")
    assert bad == {LINE}
    assert f"skipping 1 bad line(s) of {root / 'train.tsv'}" in caplog.text


def test_every_bad_line_is_counted_and_a_clean_check_is_cached(tmp_path, monkeypatch):
    root, _ = dataset_with(tmp_path, "stereo", "nan")
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError, match=r"(?s)line 4: .*has 2 channels.*1 more problem.*line 5: .*NaN"):
        check_task_split(task_cfg(root), "train")
    clean = write_tiny_dataset(tmp_path / "clean", seed=1)
    check_task_split(task_cfg(clean), "train")
    assert (clean / "train.tsv.checked").exists()
    # a cached result is used only while every file is unchanged
    sf.write(clean / "wav" / "train0.wav", np.zeros((16000, 2)), 16000)
    with pytest.raises(DataError, match="train.tsv line 2: .*train0.wav has 2 channels"):
        check_task_split(task_cfg(clean), "train")


def _labels(root, split="train"):
    return (root / f"{split}.km").read_text().splitlines()


def _write_labels(root, lines, split="train"):
    (root / f"{split}.km").write_text("\n".join(lines) + "\n")


LABEL_FAULTS = {
    "one_line_missing": (lambda root: _write_labels(root, _labels(root)[:-1]),
                         r"train.km has 5 lines but .*train.tsv lists 6 utterances.*Fix: "),
    "one_line_too_long": (lambda root: _write_labels(root, [l + " " + l if i == 2 else l
                                                           for i, l in enumerate(_labels(root))]),
                          r"train.tsv line 4: .*train.km line 3 .*labels = .* but its audio lasts .*Fix: "),
    "unknown_label": (lambda root: _write_labels(root, [l.replace("3", "77") if i == 2 else l
                                                       for i, l in enumerate(_labels(root))]),
                      r"train.tsv line 4: .*train.km line 3 .*labels not in .*dict.km.txt: 77.*Fix: "),
    "missing_dict": (lambda root: (root / "dict.km.txt").unlink(),
                     r"dictionary .*dict.km.txt does not exist.*Fix: "),
    "wrong_label_rate": (lambda root: _write_labels(root, [" ".join(l.split()[::2]) for l in _labels(root)]),
                         r"look like 50 Hz, not 100 Hz; set model.label_rate=50"),
}


@pytest.mark.parametrize("fault", sorted(LABEL_FAULTS))
def test_bad_labels_are_named_with_the_fix(fault, tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "data")
    LABEL_FAULTS[fault][0](root)
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError, match=f"(?s){LABEL_FAULTS[fault][1]}"):
        check_task_split(task_cfg(root), "train")


def test_label_duration_tolerance_is_fairseqs_tenth_of_a_second(tmp_path):
    root = write_tiny_dataset(tmp_path / "data")
    labels = _labels(root)
    _write_labels(root, [l + " 1" * 9 if i == 0 else l for i, l in enumerate(labels)])  # +0.09 s
    check_task_split(task_cfg(root), "train")
    _write_labels(root, [l + " 1" * 12 if i == 0 else l for i, l in enumerate(labels)])  # +0.12 s
    with pytest.raises(DataError, match="tolerance 0.1 s"):
        check_task_split(task_cfg(root), "train")


def test_skipped_lines_are_dropped_from_fairseqs_dataset(tmp_path, monkeypatch):
    root, _ = dataset_with(tmp_path, "missing")
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    import fairseq_mamba  # noqa: F401  (installs the hook)

    task = HubertPretrainingTask.setup_task(task_cfg(root))
    task.load_dataset("train")
    dataset = task.datasets["train"]
    assert len(dataset) == 5 and "wav/train2.wav" not in dataset.audio_names
    assert dataset.manifest_lines == [2, 3, 5, 6, 7]
    labels = _labels(root)
    for i, line in enumerate(dataset.manifest_lines):  # labels stay with their audio
        item = dataset[i]
        assert item["label_list"][0].tolist() == [task.dictionaries[0].index(u) for u in labels[line - 2].split()]


def test_a_file_that_breaks_after_the_check_names_itself_from_a_loader_worker(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "data")
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    import fairseq_mamba  # noqa: F401

    task = HubertPretrainingTask.setup_task(task_cfg(root))
    task.load_dataset("train")
    dataset = task.datasets["train"]
    (root / dataset.audio_names[1]).write_text("gone")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=dataset.collater)
    with pytest.raises(DataError) as err:
        list(loader)
    message = str(err.value)
    assert f"{root / 'train.tsv'} line 3: reading {root / dataset.audio_names[1]} failed" in message
    assert "Fix: it passed the check at start" in message


def run(cmd, env=None):
    full_env = subprocess_env()
    full_env.pop(BAD_LINES_ENV, None)
    full_env.update(env or {})
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def train(config, root, run_dir, *extra, env=None):
    return run([BIN / "fairseq-hydra-train", "--config-dir", "examples/pretrain", "--config-name", config,
                f"task.data={root}", f"task.label_dir={root}", "common.user_dir=fairseq_mamba",
                f"hydra.run.dir={run_dir}", "common.log_format=json", "common.log_interval=1", *extra], env)


@pytest.mark.parametrize("config,fault,expected", [
    ("mamba_hubert_tiny_cpu", "nan", f"train.tsv line {LINE}: "),
    ("hubert_tiny_cpu", "label_lines", "train.km has 5 lines but"),
])
def test_training_stops_before_the_first_update(config, fault, expected, tmp_path):
    if fault == "label_lines":
        root = write_tiny_dataset(tmp_path / "data")
        LABEL_FAULTS["one_line_missing"][0](root)
    else:
        root, _ = dataset_with(tmp_path, fault)
    rc, log = train(config, root, tmp_path / "run", "optimization.max_update=2", "dataset.num_workers=2")
    assert rc != 0
    assert "DataError: " in log and expected in log and "Fix: " in log
    assert "train_inner" not in log and "DataLoader worker" not in log
    assert not list((tmp_path / "run").rglob("checkpoint*.pt"))


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory):
    """mamba_hubert trained 2 updates with two bad lines skipped; -> (data root, log, checkpoint)."""
    tmp = tmp_path_factory.mktemp("skip")
    root, _ = dataset_with(tmp, "stereo", "missing")
    rc, log = train("mamba_hubert_tiny_cpu", root, tmp / "run", "optimization.max_update=2",
                    env={BAD_LINES_ENV: "skip"})
    assert rc == 0, log[-3000:]
    return root, log, tmp / "run" / "checkpoints" / "checkpoint_last.pt"


def test_training_skips_bad_lines_when_asked_and_counts_them(skipped_run):
    root, log, checkpoint = skipped_run
    assert f"{BAD_LINES_ENV}=skip: skipping 2 bad line(s) of {root / 'train.tsv'}" in log
    assert "has 2 channels" in log and "does not exist" in log
    assert "done training" in log and checkpoint.exists()


def upstream(*args, env=None):
    return run([sys.executable, "-m", "fairseq_mamba.fairseq_fixes.upstream", *args], env)


@pytest.fixture(scope="module")
def skipped_features(tmp_path_factory):
    """MFCC features, k-means and labels of a dataset whose line 4 has an inf sample, made with
    FAIRSEQ_MAMBA_BAD_LINES=skip; -> (data root, work dir)."""
    tmp = tmp_path_factory.mktemp("feat")
    root, _ = dataset_with(tmp, "inf")
    for args in (("dump_mfcc_feature", root, "train", 1, 0, tmp / "feat"),
                 ("learn_kmeans", tmp / "feat", "train", 1, tmp / "km.bin", 3, "--percent", "-1"),
                 ("dump_km_label", tmp / "feat", "train", tmp / "km.bin", 1, 0, tmp / "lab")):
        rc, log = upstream(*args, env={BAD_LINES_ENV: "skip"})
        assert rc == 0, log[-3000:]
        if args[0] == "dump_mfcc_feature":
            assert "skipping 1 bad line(s)" in log and "NaN/inf samples" in log
    return root, tmp


def test_mfcc_dump_stops_before_work(skipped_features, tmp_path):
    root, _ = skipped_features
    rc, log = upstream("dump_mfcc_feature", root, "train", 1, 0, tmp_path / "feat")
    assert rc == 1 and log.count("DataError: ") == 1 and "Traceback" not in log
    assert f"train.tsv line {LINE}: " in log and "NaN/inf samples" in log and "Fix: " in log
    assert not (tmp_path / "feat" / "train_0_1.npy").exists()


def test_skipped_lines_get_no_frames_so_labels_stay_line_aligned(skipped_features):
    _, work = skipped_features
    lengths = [int(x) for x in (work / "feat" / "train_0_1.len").read_text().split()]
    assert len(lengths) == 6 and lengths[2] == 0 and all(n > 0 for i, n in enumerate(lengths) if i != 2)
    assert np.load(work / "feat" / "train_0_1.npy").shape == (sum(lengths), 39)
    labels = (work / "lab" / "train_0_1.km").read_text().splitlines()
    assert [len(line.split()) for line in labels] == lengths  # an empty label line for the bad one


def test_kmeans_and_label_dump_check_their_inputs(skipped_features, tmp_path, monkeypatch):
    """The checks fairseq_mamba.fairseq_fixes.upstream runs before learn_kmeans / dump_km_label (in-process: the
    wrapper's command-line path is exercised by the feature-dump tests)."""
    from fairseq_mamba.fairseq_fixes.upstream import patch_input_checks, simple_kmeans_dir

    monkeypatch.syspath_prepend(simple_kmeans_dir())
    _, work = skipped_features
    with pytest.raises(DataError, match=r"(?s)k-means model .*none.bin does not exist.*stage 03"):
        patch_input_checks("dump_km_label", [work / "feat", "train", tmp_path / "none.bin", 1, 0, tmp_path])
    joblib.dump(SimpleNamespace(cluster_centers_=np.zeros((3, 768))), tmp_path / "km768.bin")
    with pytest.raises(DataError, match=r"feature dimensions differ: .*'the k-means model': 768"):
        patch_input_checks("dump_km_label", [work / "feat", "train", tmp_path / "km768.bin", 1, 0, tmp_path])
    shutil.copytree(work / "feat", tmp_path / "feat")
    np.save(tmp_path / "feat" / "train_0_1.npy", np.load(work / "feat" / "train_0_1.npy")[:-7])
    for script, args in (("learn_kmeans", [tmp_path / "feat", "train", 1, tmp_path / "km.bin", 3]),
                         ("dump_km_label", [tmp_path / "feat", "train", work / "km.bin", 1, 0, tmp_path])):
        with pytest.raises(DataError, match=r"(?s)train_0_1.npy has shape .*the dump was interrupted.*Fix: "):
            patch_input_checks(script, [str(a) for a in args])
    (tmp_path / "feat" / "train_0_1.len").unlink()
    with pytest.raises(DataError, match=r"train_0_1.npy/.len cannot be read"):
        patch_input_checks("learn_kmeans", [str(tmp_path / "feat"), "train", "1", "km.bin", "3"])


def test_a_shard_of_only_bad_lines_has_no_feature_size():
    from fairseq_mamba.fairseq_fixes.upstream import _BadPath, _SkippingReader

    reader = _SkippingReader(SimpleNamespace(get_feats=None), lambda: iter([(_BadPath("a.wav"), 9)]))
    with pytest.raises(DataError, match=r"every line of this shard is bad \(e.g. a.wav\)"):
        reader.get_feats(_BadPath("a.wav"), 9)


def test_hubert_feature_dump_stops_before_work(skipped_run, tmp_path):
    root, _, checkpoint = skipped_run  # its manifest still lists the two bad lines
    rc, log = upstream("dump_hubert_feature", root, "train", checkpoint, 1, 1, 0, tmp_path / "feat")
    assert rc == 1 and log.count("DataError: ") == 1 and "Traceback" not in log
    assert f"train.tsv line {LINE}: " in log and "has 2 channels" in log and "1 more problem" in log
    assert not (tmp_path / "feat" / "train_0_1.npy").exists()


def write_corpus(root: Path, n=4):
    """A bundled-corpus look-alike (id, relative flac path, samples; .wrd) for stage 01."""
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        rows = []
        for i in range(n):
            sf.write(root / "audio" / f"{split}{i}.flac", 0.1 * rng.standard_normal(8000), 16000)
            rows.append(f"{split}{i}\taudio/{split}{i}.flac\t8000")
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        (root / f"{split}.wrd").write_text("A B\n" * n)
    return root


def test_manifest_stage_checks_every_file_before_writing(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    sf.write(corpus / "audio" / "valid2.flac", 0.1 * np.ones((8000, 2)), 16000)  # stereo, valid line 3
    out = tmp_path / "data"
    rc, log = run(["bash", REPO / "run_scripts" / "01_manifests.sh", corpus, out])
    assert rc == 1 and "Traceback" not in log
    assert f"{corpus / 'valid.tsv'} line 3: {corpus / 'audio' / 'valid2.flac'} has 2 channels" in log
    assert "Fix: convert it" in log
    assert not (out / "train.tsv").exists()  # train was fine, but nothing is written
    rc, log = run(["bash", REPO / "run_scripts" / "01_manifests.sh", corpus, out], env={BAD_LINES_ENV: "skip"})
    assert rc == 0, log
    assert "valid: left out 1 bad line(s)" in log
    assert len((out / "valid.tsv").read_text().splitlines()) == 1 + 3
    assert len((out / "valid.wrd").read_text().splitlines()) == 3
    assert (out / "valid.tsv.checked").exists()  # later stages only stat the files


def test_bad_line_option_itself_is_checked(monkeypatch):
    monkeypatch.setenv(BAD_LINES_ENV, "ignore")
    with pytest.raises(DataError, match="use 'error' \\(default\\) or 'skip'"):
        data_checks.skipping()
