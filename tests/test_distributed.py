"""mamba_hubert trains a few updates with two CPU processes (gloo).

fairseq 0.12's CPU multi-process situation (checked in fairseq/distributed/utils.py):
* its own spawn path (``call_main`` -> ``torch.multiprocessing.spawn``) starts
  ``min(torch.cuda.device_count(), world_size)`` processes, i.e. none without a GPU, and
  ``_infer_single_node_init`` asserts world_size <= cuda device count;
* its torchrun/torch.distributed.launch path (MASTER_ADDR, ..., RANK in the environment) computes
  ``rank % torch.cuda.device_count()`` -> ZeroDivisionError on CPU.
What works: start one fairseq-hydra-train per rank ourselves with an explicit
``distributed_init_method=tcp://...``, ``distributed_rank=R`` and ``distributed_no_spawn=true``
(then ``call_main`` goes straight to ``distributed_init`` -> ``init_process_group``), plus
``common.cpu=true distributed_training.distributed_backend=gloo``, through
``python -m fairseq_mamba.fairseq_fixes.upstream fairseq-hydra-train`` whose CPU ``all_gather_list`` replaces
fairseq's (that one allocates ``torch.cuda.ByteTensor``).
"""
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, subprocess_env, write_tiny_dataset


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mamba_hubert_two_cpu_processes_gloo(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_train=8, n_valid=2)
    out = tmp_path / "run"
    port = free_port()
    cmd = [
        sys.executable, "-m", "fairseq_mamba.fairseq_fixes.upstream", "fairseq-hydra-train",
        "--config-dir", "examples/pretrain", "--config-name", "mamba_hubert_tiny_cpu",
        f"task.data={data}", f"task.label_dir={data}", "common.user_dir=fairseq_mamba",
        f"hydra.run.dir={out}", "common.cpu=true", "common.log_interval=1",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.nprocs_per_node=2",
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
        "distributed_training.distributed_no_spawn=true", "distributed_training.device_id=0",
        "optimization.max_update=3", "lr_scheduler.warmup_updates=1",
        "dataset.max_tokens=100000", "checkpoint.save_interval_updates=3",
    ]
    procs, logs = [], []
    for rank in range(2):
        env = subprocess_env()
        for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(k, None)
        env["OMP_NUM_THREADS"] = "1"
        log = open(tmp_path / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd + [f"distributed_training.distributed_rank={rank}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert rcs == [0, 0], "\n\n".join(t[-4000:] for t in texts)
    assert "distributed init (rank 0)" in texts[0] and "distributed init (rank 1)" in texts[1]
    assert "training on 2 devices" in texts[0]
    assert "num_updates 3" in texts[0] and "done training" in texts[0]
    ckpt = torch.load(out / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert ckpt["optimizer_history"][-1]["num_updates"] == 3
