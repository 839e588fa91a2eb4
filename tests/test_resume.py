"""Kill and resume (issue #6, point 3): a run killed with SIGKILL resumes from checkpoint_last.pt
with exactly the losses and weights of an uninterrupted run, and a kill while a checkpoint is
being written leaves the previous one loadable.

All runs: tiny mamba_hubert on CPU, one thread, seed 1337, dropout on, random crops on, several
batches per epoch (the resume point is mid-epoch), a checkpoint every 2 updates. These tests run
fairseq-hydra-train in real processes (that is what is killed): ~80 s for the file on a shared
2-core machine.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import fairseq_mamba  # noqa: F401  (lets torch load fairseq checkpoints)
from fairseq import checkpoint_utils

from conftest import BIN, REPO, subprocess_env, write_tiny_dataset

UPDATES = 8
COMMON = ["--config-dir", "examples/pretrain", "--config-name", "mamba_hubert_tiny_cpu",
          "common.user_dir=fairseq_mamba", "common.log_format=json", "common.log_interval=1",
          f"optimization.max_update={UPDATES}", "checkpoint.save_interval_updates=2",
          "dataset.max_tokens=30000", "dataset.validate_interval=1000"]

# Runs fairseq-hydra-train in this process, SIGKILLing it in the middle of copying the checkpoint
# of update $DIE_AT_UPDATE (checkpoint_<epoch>_<update>.pt) to checkpoint_last.pt: half the bytes
# written, then the kill.
# $COPY=fairseq puts fairseq's own (non-atomic) PathManager back, to show the window is real.
DYING_COPY = """
import os, shutil, signal, sys
real_copyfile = shutil.copyfile
def dying_copyfile(src, dst, **kwargs):
    if os.path.basename(dst).startswith("checkpoint_last") and src.endswith(
            "_" + os.environ["DIE_AT_UPDATE"] + ".pt"):
        data = open(src, "rb").read()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_copyfile(src, dst, **kwargs)
shutil.copyfile = dying_copyfile
import fairseq_mamba
if os.environ.get("COPY") == "fairseq":
    from fairseq import checkpoint_utils, file_io
    checkpoint_utils.PathManager = file_io.PathManager
from fairseq_cli.hydra_train import cli_main
sys.argv = ["fairseq-hydra-train", *sys.argv[1:]]
cli_main()
"""


def env(**extra):
    e = subprocess_env()
    e.update(OMP_NUM_THREADS="1", **extra)
    return e


def args(data, run_dir):
    return [*COMMON, f"task.data={data}", f"task.label_dir={data}", f"hydra.run.dir={run_dir}"]


def train(data, run_dir, **extra_env):
    p = subprocess.run([str(BIN / "fairseq-hydra-train"), *args(data, run_dir)], cwd=REPO,
                       env=env(**extra_env), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def losses(log):
    """{update: logged training loss} from fairseq's json log."""
    out = {}
    for line in log.splitlines():
        if "[train_inner]" in line:
            record = json.loads(line[line.index("{"):])
            out[int(record["num_updates"])] = record["loss"]
    return out


def weights(run_dir):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(run_dir / "checkpoints" / "checkpoint_last.pt"))
    return state["model"], state["optimizer_history"][-1]["num_updates"]


def resumed_from(log):
    match = re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch (\d+) @ (\d+) updates\)", log)
    assert match, log[-3000:]
    return int(match.group(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    log = train(data, run_dir)
    assert sorted(losses(log)) == list(range(1, UPDATES + 1))
    assert "end of epoch 1" in log and "end of epoch 2" in log  # several batches per epoch
    return losses(log), weights(run_dir)


def assert_continues_exactly(log, run_dir, uninterrupted, start):
    want_losses, (want_weights, _) = uninterrupted
    got = losses(log)
    assert sorted(got) == list(range(start + 1, UPDATES + 1))
    assert got == {u: want_losses[u] for u in got}, (got, want_losses)
    got_weights, updates = weights(run_dir)
    assert updates == UPDATES and got_weights.keys() == want_weights.keys()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)


def test_sigkill_mid_run_resumes_with_the_uninterrupted_losses(data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "fairseq-hydra-train"), *args(data, run_dir)], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"Saved checkpoint .* @ 4 updates", line):
            proc.send_signal(signal.SIGKILL)  # somewhere in update 5 or 6
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert "done training" not in "".join(seen)
    log = train(data, run_dir)
    start = resumed_from(log)
    assert start >= 4
    assert_continues_exactly(log, run_dir, uninterrupted, start)


def dying_copy(data, run_dir, update, **extra_env):
    p = subprocess.run([sys.executable, "-c", DYING_COPY, *args(data, run_dir)], cwd=REPO,
                       env=env(DIE_AT_UPDATE=str(update), **extra_env), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, (p.stdout + p.stderr)[-3000:]
    return run_dir / "checkpoints" / "checkpoint_last.pt"


def test_fairseqs_own_copy_leaves_a_broken_checkpoint_last(data, tmp_path):
    """The window exists: killed while copying the first checkpoint, fairseq's copy leaves half a file."""
    last = dying_copy(data, tmp_path / "run", 2, COPY="fairseq")
    with pytest.raises(RuntimeError, match="zip archive"):  # torch: "failed finding central directory"
        checkpoint_utils.load_checkpoint_to_cpu(str(last))


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(data, uninterrupted, tmp_path):
    """Killed in the middle of copying the update-4 checkpoint to checkpoint_last.pt."""
    run_dir = tmp_path / "run"
    last = dying_copy(data, run_dir, 4)
    assert os.path.getsize(str(last) + ".tmp") < os.path.getsize(last)  # the half-written copy
    _, updates = weights(run_dir)
    assert updates == 2  # the previous good checkpoint, loadable
    log = train(data, run_dir)
    assert resumed_from(log) == 2
    assert_continues_exactly(log, run_dir, uninterrupted, 2)
