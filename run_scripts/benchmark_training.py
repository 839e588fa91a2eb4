"""(c) of run_scripts/benchmark.py: training seconds per update of the tiny CPU configs.

Both models (``examples/pretrain/{mamba_hubert,hubert}_tiny_cpu.yaml``) train through the
real ``fairseq-hydra-train`` on the same data: the first ``n_utts`` utterances of the bundled
corpus's train split with random 100 Hz k-means-style labels (the labels' values do not change
the cost of an update). fairseq logs the updates per second of every ``log_interval`` updates
(``ups``, a wall-clock rate); the first interval (start-up, first-call costs) is dropped and
the rest averaged, so seconds per update = 1 / mean(ups). Both models run one after the other
in the same call, with the same threads, so their ratio is the comparable number.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus" / "data"
MODELS = ("mamba_hubert", "hubert")
N_UNITS = 50
UPS = re.compile(r"\bups=([0-9.]+)")


def write_data(out: Path, n_utts: int, seed: int = 0) -> Path:
    """fairseq manifests train/valid.tsv (the first n_utts corpus utterances) + random labels."""
    rows = [line.split("\t") for line in (CORPUS / "train.tsv").read_text().splitlines()[:n_utts]]
    if len(rows) < n_utts:
        raise ValueError(f"{CORPUS / 'train.tsv'} has {len(rows)} utterances, fewer than n_utts={n_utts}")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    tsv = [str(CORPUS)] + [f"{r[1]}\t{r[2]}" for r in rows]
    km = [" ".join(map(str, rng.integers(0, N_UNITS, int(r[2]) // 160))) for r in rows]
    for split in ("train", "valid"):
        (out / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (out / f"{split}.km").write_text("\n".join(km) + "\n")
    (out / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(N_UNITS)))
    return out


def seconds_per_update(model: str, data: Path, out: Path, updates: int, interval: int, threads: int):
    """Train ``updates`` updates; returns (sec/update, [ups per interval]) from fairseq's log."""
    cmd = [str(Path(sys.executable).parent / "fairseq-hydra-train"),
           "--config-dir", "examples/pretrain", "--config-name", f"{model}_tiny_cpu",
           f"task.data={data}", f"task.label_dir={data}", "common.user_dir=fairseq_mamba",
           f"hydra.run.dir={out}", f"optimization.max_update={updates}",
           f"common.log_interval={interval}", "checkpoint.no_save=true",
           "dataset.validate_interval=100000", "lr_scheduler.warmup_updates=1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}: fairseq-hydra-train failed (rc={proc.returncode}), "
                           f"log: {out / 'train.log'}\n{(proc.stdout + proc.stderr)[-2000:]}")
    ups = [float(m.group(1)) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
           if "train_inner" in line
           for m in [UPS.search(line)] if m]
    if len(ups) < 2:
        raise RuntimeError(f"{model}: fewer than 2 logged intervals in {out / 'train.log'}")
    steady = ups[1:]
    return 1.0 / (sum(steady) / len(steady)), ups


def bench_training(out_dir: Path, quick: bool, threads: int):
    """{model: {sec_per_update, ups, updates, n_utts}} for both tiny configs."""
    n_utts, updates, interval = (8, 6, 2) if quick else (64, 40, 5)
    data = write_data(out_dir / "training_data", n_utts)
    rows = {}
    for model in MODELS:
        spu, ups = seconds_per_update(model, data, out_dir / f"training_{model}", updates,
                                      interval, threads)
        rows[model] = dict(sec_per_update=spu, ups=ups, updates=updates, n_utts=n_utts,
                           threads=threads, interval=interval)
        print("[training]", model, rows[model], flush=True)
    return rows


def training_report(rows):
    first = next(iter(rows.values()))
    lines = ["", "### (c) Training, tiny CPU configs (fairseq-hydra-train)", "",
             f"`examples/pretrain/*_tiny_cpu.yaml` on the first {first['n_utts']} bundled train "
             f"utterances (random 100 Hz labels), {first['updates']} updates, "
             f"OMP_NUM_THREADS={first['threads']}; seconds per update = 1 / mean of fairseq's "
             f"`ups` over every {first['interval']}-update interval after the first.", "",
             "| model | s / update | relative to hubert |", "|---|---|---|"]
    base = rows["hubert"]["sec_per_update"]
    for model, r in rows.items():
        lines.append(f"| {model} | {r['sec_per_update']:.2f} | {r['sec_per_update'] / base:.2f}x |")
    return lines
