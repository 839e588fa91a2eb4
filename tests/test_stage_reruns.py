"""Re-running the pipeline (issue #6, point 3): a stage whose outputs are complete is skipped, a
partial one is redone, and outputs made from other inputs are never overwritten silently: the
stage stops and says how to redo it (FORCE=1). The shared logic is run_scripts/common.sh.
Stages run as the demo runs them (bash, fairseq's scripts in subprocesses): ~65 s for the file on a
shared 2-core machine, most of it three starts of dump_km_label and four of stage 01."""
import subprocess

import joblib
import numpy as np
import pytest
import soundfile as sf
from sklearn.cluster import MiniBatchKMeans

from conftest import REPO, subprocess_env

STAGES = REPO / "run_scripts"


def bash(script, *args, env=None, check=True):
    full_env = subprocess_env()
    full_env.pop("FORCE", None)
    full_env.update(env or {})
    p = subprocess.run(["bash", "-c", script, "bash", *map(str, args)], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=600)
    assert not check or p.returncode == 0, p.stdout + p.stderr
    return p.returncode, p.stderr


def stage(name, *args, env=None, check=True):
    return bash(f'exec bash "{STAGES / name}" "$@"', *args, env=env, check=check)


NEEDS_RUN = f'source "{STAGES / "common.sh"}"; {{ needs_run "$1" "$2" "a shard" "$3" && echo RUN || echo SKIP; }} >&2'


def test_needs_run_protocol(tmp_path):
    marker, out = tmp_path / "x.done", tmp_path / "x.npy"
    assert bash(NEEDS_RUN, marker, "stamp A", out) == (0, "RUN\n") and not marker.exists()
    out.write_text("half")  # a partial run: no marker, some output
    rc, err = bash(NEEDS_RUN, marker, "stamp A", out)
    assert "a shard is incomplete (no x.done): redoing it" in err and "RUN" in err
    bash(f'source "{STAGES / "common.sh"}"; mark_done "$1" "stamp A"', marker)
    assert marker.read_text() == "stamp A\n"
    rc, err = bash(NEEDS_RUN, marker, "stamp A", out)
    assert "a shard done, skipping" in err and "SKIP" in err
    rc, err = bash(NEEDS_RUN, marker, "stamp B", out, check=False)
    assert rc == 1 and "RUN" not in err and "SKIP" not in err
    assert "a shard" in err and "was made from other inputs or settings" in err
    assert "made from: stamp A" in err and "asked for: stamp B" in err and "FORCE=1" in err
    rc, err = bash(NEEDS_RUN, marker, "stamp B", out, env={"FORCE": "1"})
    assert "FORCE=1: redoing a shard (was made from: stamp A)" in err and "RUN" in err
    assert not out.exists() and not marker.exists()  # the old outputs go: nothing resumes from them


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("one\n")
    fp = f'source "{STAGES / "common.sh"}"; fingerprint "$@" >&2'
    first = bash(fp, f)[1]
    assert bash(fp, f)[1] == first and len(first.strip()) == 16
    f.write_text("two\n")
    assert bash(fp, f)[1] != first


def test_manifest_stage_skips_refuses_and_forces(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "data"
    (corpus / "audio").mkdir(parents=True)
    for i in range(3):
        sf.write(corpus / "audio" / f"u{i}.flac", 0.1 * np.random.default_rng(i).standard_normal(8000), 16000)
    (corpus / "train.tsv").write_text("".join(f"u{i}\taudio/u{i}.flac\t8000\n" for i in range(3)))
    (corpus / "train.wrd").write_text("A\nB\nC\n")
    stage("01_manifests.sh", corpus, out)
    first = (out / "train.ltr").read_text()
    assert f"manifests in {out} done, skipping" in stage("01_manifests.sh", corpus, out)[1]
    (corpus / "train.wrd").write_text("A\nB\nD\n")  # other inputs
    rc, err = stage("01_manifests.sh", corpus, out, check=False)
    assert rc == 1 and "was made from other inputs" in err and "FORCE=1" in err
    assert (out / "train.ltr").read_text() == first  # not overwritten
    _, err = stage("01_manifests.sh", corpus, out, env={"FORCE": "1"})
    assert "FORCE=1: redoing manifests in" in err and (out / "train.ltr").read_text().endswith("D |\n")
    (out / ".done").unlink()  # as if killed before the end
    assert "is incomplete (no .done): redoing it" in stage("01_manifests.sh", corpus, out)[1]


@pytest.fixture
def features(tmp_path):
    """Two train shards of random 'features' as fairseq's dump scripts write them, and a k-means model."""
    rng = np.random.default_rng(0)
    feat = tmp_path / "feat"
    feat.mkdir()
    for r in range(2):
        lengths = rng.integers(5, 20, size=3)
        np.save(feat / f"train_{r}_2.npy", rng.standard_normal((lengths.sum(), 4)).astype(np.float32))
        (feat / f"train_{r}_2.len").write_text("".join(f"{n}\n" for n in lengths))
    km = MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0).fit(rng.standard_normal((50, 4)))
    joblib.dump(km, tmp_path / "km.bin")
    return feat, tmp_path / "km.bin"


def test_kmeans_stage_keeps_a_model_made_from_other_features(features, tmp_path):
    feat, _ = features
    km = tmp_path / "km" / "k3.bin"
    stage("03_kmeans.sh", feat, km, 3, 2)
    model = km.read_bytes()
    assert "done, skipping" in stage("03_kmeans.sh", feat, km, 3, 2)[1]
    rc, err = stage("03_kmeans.sh", feat, km, 4, 2, check=False)  # other settings
    assert rc == 1 and "k=3" in err and "k=4" in err and "FORCE=1" in err
    np.save(feat / "train_1_2.npy", np.load(feat / "train_1_2.npy") + 1)  # other features
    rc, err = stage("03_kmeans.sh", feat, km, 3, 2, check=False)
    assert rc == 1 and "was made from other inputs" in err and km.read_bytes() == model


def test_label_stage_redoes_only_a_partial_shard(features, tmp_path):
    feat, km = features
    lab = tmp_path / "lab"
    stage("04_labels.sh", feat, km, lab, 2, env={"SPLITS": "train"})
    merged = (lab / "train.km").read_text()
    assert len(merged.splitlines()) == 6
    # shard 1 of train was interrupted: no marker, half a file
    (lab / "train_1_2.done").unlink()
    (lab / "train_1_2.km").write_text(merged[:3])
    _, err = stage("04_labels.sh", feat, km, lab, 2, env={"SPLITS": "train"})
    assert "train shard 0/2 labels done, skipping" in err
    assert "train shard 1/2 labels is incomplete (no train_1_2.done): redoing it" in err
    assert "labels train shard 1/2" in err and "labels train shard 0/2" not in err
    assert (lab / "train.km").read_text() == merged  # same inputs, same labels: merge skipped
    assert f"{lab / 'train.km'} done, skipping" in err
