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


def base_model(model: str):
    """The model section of examples/pretrain/<model>_base_librispeech.yaml (label_rate 50,
    500 units, iteration 2), built without a task."""
    from fairseq.data import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf

    from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel

    section = OmegaConf.load(ROOT / "examples" / "pretrain" / f"{model}_base_librispeech.yaml").model
    del section["_name"]
    section.label_rate = 50
    cls, cfg_cls = {"hubert": (HubertModel, HubertConfig),
                    "mamba_hubert": (MambaHubertModel, MambaHubertConfig)}[model]
    dictionary = Dictionary()
    for i in range(500):
        dictionary.add_symbol(str(i))
    return cls(OmegaConf.merge(OmegaConf.structured(cfg_cls), section),
               HubertPretrainingConfig(label_rate=50), [dictionary])


def bench_base_update(frames=(250, 1000), batch=1, rounds=3):
    """CPU seconds of one training update (forward, HuBERT's masked-prediction loss, backward,
    Adam step) of the base configs on one fp32 batch of ``batch`` utterances of each length
    in ``frames`` (20 ms frames); the minimum over ``rounds`` rounds, each timing both
    models in turn."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    models = {m: base_model(m).train() for m in MODELS}
    optims = {m: torch.optim.Adam(models[m].parameters(), lr=1e-5) for m in MODELS}
    out = {}
    for n in frames:
        wav = torch.randn(batch, n * 320)
        pad = torch.zeros(wav.shape, dtype=torch.bool)
        labels = torch.randint(0, 500, (batch, n))

        def update(m):
            net = models[m](wav, target_list=[labels], padding_mask=pad)
            logits, targets = (f(net, True)[0] for f in (models[m].get_logits, models[m].get_targets))
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            optims[m].step()
            optims[m].zero_grad(set_to_none=True)

        for m in MODELS:
            update(m)  # first-call costs
        times = {m: [] for m in MODELS}
        for _ in range(rounds):
            for m in MODELS:
                t = time.process_time()
                update(m)
                times[m].append(time.process_time() - t)
        out[n] = {m: min(v) for m, v in times.items()}
        print("[base update]", n, out[n], flush=True)
    return out


def base_update_report(rows, batch=1, rounds=3):
    lines = ["", "### (d) Training update, base configs (one batch, fp32)", "",
             f"`examples/pretrain/{{mamba_hubert,hubert}}_base_librispeech.yaml` (model section; "
             f"500 units), one batch of {batch} utterance(s), random audio and labels: forward, "
             "masked-prediction cross-entropy, backward, Adam step; CPU seconds, the minimum of "
             f"{rounds} interleaved rounds.", "",
             "| frames per utterance | hubert s | mamba_hubert s | relative to hubert |",
             "|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['hubert']:.2f} | {r['mamba_hubert']:.2f} | "
                     f"{r['mamba_hubert'] / r['hubert']:.2f}x |")
    return lines
