"""The GPU check's measurements (run by gpu_check.sh); writes OUT/gpu_check.{md,json}.

    python run_scripts/gpu_check.py OUT                 one CUDA GPU, a few minutes
    python run_scripts/gpu_check.py --cpu-dry-run OUT   the same steps at tiny sizes on CPU, the
                                                        kernels replaced by their CPU stand-ins

1. environment: GPU, torch, the kernel packages and why a kernel is missing;
2. our scan (PyTorch path) against mamba-ssm's selective_scan_fn, fp32 and bf16, each also
   against the fp64 reference;
3. every layer type's kernel path against its PyTorch path (padded batch with garbage padding,
   output and all gradients), fp32 and bf16 model;
4. two training updates of each base config in fp16 through fairseq's Trainer (dry run: the
   tiny configs in bf16), with the losses and the dtypes of the live parameters;
5. one encoder layer's speed, Mamba types against fairseq's attention layer, 500-8000 frames.
"""
import argparse
import collections
import importlib.metadata
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "run_scripts"), str(ROOT / "tests")]

from fairseq_mamba import ops  # noqa: E402
from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls  # noqa: E402
from fairseq_mamba.ops.reference_kernels import reference_kernels  # noqa: E402

# Kernel vs PyTorch path, relative error (norm of the difference / norm): pass below these.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SIZES = {
    "gpu": dict(scan=(2, 256, 16, 4099), dim=768, lengths=(1000, 613), expand=1,
                speed=(500, 1000, 2000, 4000, 8000), reps=5,
                configs=("mamba_hubert_base_librispeech", "hubert_base_librispeech"),
                train=["common.fp16=true"]),  # as the base configs have it
    "cpu": dict(scan=(2, 16, 8, 97), dim=32, lengths=(40, 13), expand=2, speed=(50, 100), reps=1,
                configs=("mamba_hubert_tiny_cpu", "hubert_tiny_cpu"),
                train=["common.bf16=true", "common.cpu=true"]),
}
PACKAGES = ("torch", "mamba-ssm", "causal-conv1d", "fairseq-fixed", "fairseq")


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def counted(kernels, calls):
    """The same kernels, each call counted in ``calls``."""
    def wrap(name, fn):
        if fn is None:
            return None

        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call
    return ops.Kernels(wrap("selective_scan_fn", kernels.selective_scan_fn),
                       wrap("mamba_inner_fn", kernels.mamba_inner_fn),
                       wrap("causal_conv1d_fn", kernels.causal_conv1d_fn),
                       kernels.device_type, kernels.dtypes)


def environment(device):
    rows = [("device", torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"),
            ("torch CUDA", str(torch.version.cuda))]
    for pkg in PACKAGES:
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    for module in ("selective_scan_cuda", "causal_conv1d_cuda"):
        try:
            __import__(module)
            rows.append((module, "imports"))
        except Exception as exc:  # the reason the dispatch falls back to PyTorch
            rows.append((module, f"missing: {exc!r}"[:200]))
    rows += [("selective_scan_fn used", str(ops.HAS_CUDA_SCAN)),
             ("causal_conv1d_fn used", str(ops.HAS_CUDA_CONV))]
    return rows


def scan_parity(kernels, device, size):
    batch, dim, d_state, length = size
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in TOL:
        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device, dt).requires_grad_()
        x = dict(u=rand(batch, dim, length), delta=rand(batch, dim, length),
                 A=(-torch.rand(dim, d_state, generator=g) - 0.5).to(device).requires_grad_(),
                 B=rand(batch, d_state, length), C=rand(batch, d_state, length),
                 D=rand(dim, dt=torch.float32), z=rand(batch, dim, length),
                 delta_bias=rand(dim, dt=torch.float32))
        cot = torch.randn(batch, dim, length, generator=g).to(device, dtype)

        def run():
            out, last = ops.selective_scan(**x, delta_softplus=True, return_last_state=True)
            return out, last, torch.autograd.grad((out * cot).sum(), list(x.values()))
        with ops.use_kernels(ops.NO_KERNELS):
            ours = run()
        calls = collections.Counter()
        with ops.use_kernels(counted(kernels, calls)):
            kern = run()
        with torch.no_grad():
            exact = ops.selective_scan_reference(
                **{k: v.detach().cpu().double() for k, v in x.items()}, delta_softplus=True)
        grad_err = max(rel_err(a, b) for a, b in zip(kern[2], ours[2]))
        errs = [rel_err(kern[0], ours[0]), rel_err(kern[1], ours[1]), grad_err]
        rows.append(dict(dtype=str(dtype).split(".")[1], kernel_calls=dict(calls),
                         out=errs[0], last_state=errs[1], grads=errs[2],
                         ours_vs_fp64=rel_err(ours[0].cpu(), exact),
                         kernel_vs_fp64=rel_err(kern[0].cpu(), exact),
                         ok=bool(calls) and max(errs) < TOL[dtype]))
    return rows


def layer_parity(kernels, device, size):
    rows = []
    for kind in BIMAMBA_TYPES:
        for dtype in TOL:
            torch.manual_seed(0)
            mixer_cls = build_mixer_cls(kind, d_state=16, expand=size["expand"])
            layer = MambaEncoderLayer(size["dim"], mixer_cls, ffn_dim=2 * size["dim"],
                                      dropout=0.0).to(device, dtype).train()
            T = max(size["lengths"])
            mask = torch.arange(T)[None, :] >= torch.tensor(size["lengths"])[:, None]
            # Finite garbage: NaN padding would poison both paths' gradients through the
            # post-norm LayerNorm on padded frames (tests/test_mamba_layer.py checks NaN forwards).
            x = torch.randn(T, len(size["lengths"]), size["dim"]).masked_fill(
                mask.t()[..., None], 1e4).to(device, dtype)
            mask = mask.to(device)
            cot = torch.randn(x.shape).to(device, dtype).masked_fill(mask.t()[..., None], 0.0)

            def run():
                layer.zero_grad()
                xg = x.clone().requires_grad_()
                out, _ = layer(xg, self_attn_padding_mask=mask)
                out = out.masked_fill(mask.t()[..., None], 0.0)
                (out * cot).sum().backward()
                grads = [xg.grad.masked_fill(mask.t()[..., None], 0.0)]
                return out, grads + [p.grad.clone() for p in layer.parameters()]
            with ops.use_kernels(ops.NO_KERNELS):
                ref = run()
            calls = collections.Counter()
            with ops.use_kernels(counted(kernels, calls)):
                got = run()
            out_err = rel_err(got[0], ref[0])
            grad_err = max(rel_err(a, b) for a, b in zip(got[1], ref[1]))
            finite = all(torch.isfinite(t).all() for t in [got[0], *got[1]])
            rows.append(dict(bimamba_type=kind, dtype=str(dtype).split(".")[1],
                             kernel_calls=dict(calls), out=out_err, grads=grad_err,
                             ok=bool(calls) and finite and max(out_err, grad_err) < TOL[dtype]))
    return rows


SSM_PARAMETERS = ("A_log", "D", "dt_proj.bias")


def fairseq_updates(config, overrides, updates, work):
    """``updates`` training updates of examples/pretrain/<config>, as fairseq-hydra-train runs them.

    The config is composed by fairseq-hydra-train itself (``--cfg job``); fairseq's Trainer then
    applies common.fp16 / common.bf16 as in training (model.half() / .to(bfloat16), half batches,
    FP16Optimizer with fp32 master weights and, for fp16, the loss scaler). Returns the losses
    (an fp16 overflow skips an update and logs none), the live model's parameter dtypes (SSM
    parameters apart), and whether they are finite after the updates.
    """
    import numpy as np
    from fairseq import tasks, utils
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.trainer import Trainer
    from omegaconf import OmegaConf

    cmd = [str(Path(sys.executable).parent / "fairseq-hydra-train"), "--config-dir",
           "examples/pretrain", "--config-name", config, *overrides,
           "common.user_dir=fairseq_mamba", f"checkpoint.save_dir={work}",
           "common.tensorboard_logdir=null", "--cfg", "job"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{config}: fairseq-hydra-train --cfg job failed: {run.stderr[-2000:]}")
    cfg = OmegaConf.create(run.stdout)
    add_defaults(cfg)
    utils.import_user_module(cfg.common)
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    losses, epoch, start = [], 1, time.time()
    while len(losses) < updates and epoch <= 2 * updates:
        for samples in trainer.get_train_iterator(epoch=epoch).next_epoch_itr(shuffle=False):
            out = trainer.train_step([samples])
            if out:  # None or {} after an fp16 overflow
                losses.append(float(out["loss"]))
            if len(losses) == updates:
                break
        epoch += 1
    dtypes = collections.defaultdict(set)
    for name, p in trainer.model.named_parameters():
        ssm = next((k for k in SSM_PARAMETERS if name.endswith("." + k)), None)
        dtypes[ssm or "other"].add(str(p.dtype).split(".")[1])
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return dict(config=config, losses=losses, seconds=round(time.time() - start, 1),
                dtypes={k: sorted(v) for k, v in dtypes.items()}, finite=finite)


def train_updates(size, work):
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(work / "data", n_train=4, n_valid=1, seed=5)
    overrides = [f"task.data={data}", f"task.label_dir={data}", "task.labels=[km]",
                 "model.label_rate=100", "lr_scheduler.warmup_updates=1",
                 "distributed_training.distributed_world_size=1",
                 "distributed_training.nprocs_per_node=1", "dataset.num_workers=0",
                 "task.min_sample_size=4000", "dataset.max_tokens=100000", *size["train"]]
    rows = []
    for config in size["configs"]:
        row = fairseq_updates(config, overrides, 2, work / config)
        row["ok"] = (len(row["losses"]) == 2 and all(map(math.isfinite, row["losses"]))
                     and row["finite"]
                     and all(row["dtypes"][k] == ["float32"] for k in SSM_PARAMETERS
                             if k in row["dtypes"]))
        rows.append(row)
    return rows


def speed(device, size):
    from benchmark import build_layers

    dtype = torch.float16 if device == "cuda" else torch.float32  # as common.fp16 trains
    rows = []
    for name, layer in build_layers().items():
        layer = layer.to(device, dtype).train()
        for length in size["speed"]:
            x = torch.randn(length, 1, 768, device=device, dtype=dtype, requires_grad=True)
            row = dict(layer=name, frames=length)
            for what in ("fwd", "fwd+bwd"):
                def step():
                    with torch.set_grad_enabled(what == "fwd+bwd"):
                        out = layer(x, self_attn_padding_mask=None)[0]
                    if what == "fwd+bwd":
                        out.float().square().mean().backward()
                times = []
                for _ in range(size["reps"] + 1):  # the first run warms up
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row[f"{what}_ms"] = 1000 * sorted(times[1:])[len(times[1:]) // 2]
            if device == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
                torch.cuda.reset_peak_memory_stats()
            layer.zero_grad(set_to_none=True)
            rows.append(row)
            print("[speed]", json.dumps(row), flush=True)
    attention = {r["frames"]: r for r in rows if r["layer"].startswith("attention")}
    for r in rows:
        r["fwd+bwd vs attention"] = attention[r["frames"]]["fwd+bwd_ms"] / r["fwd+bwd_ms"]
    return rows


def table(rows, columns):
    def cell(v):
        return f"{v:.2e}" if isinstance(v, float) and v < 0.01 else (
            f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(results, dry_run):
    md = ["# GPU check" + (" (CPU dry run: tiny sizes, CPU stand-ins for the kernels)" if dry_run
                           else ""), "",
          f"`python run_scripts/gpu_check.py` on {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{results['seconds']:.0f} s. Tolerances (relative error, kernel vs PyTorch path): "
          "fp32 1e-4, bf16 3e-2.", "", "## Environment", "",
          table([dict(what=k, value=v) for k, v in results["environment"]], ["what", "value"]),
          "", "## Scan: selective_scan_fn against our scan", "",
          table(results["scan"], ["dtype", "kernel_calls", "out", "last_state", "grads",
                                  "ours_vs_fp64", "kernel_vs_fp64", "ok"]),
          "", "## Layers: kernel path against PyTorch path (padded batch, padding 1e4)", "",
          table(results["layers"], ["bimamba_type", "dtype", "kernel_calls", "out", "grads", "ok"]),
          "", "## Two training updates of each config (fairseq's Trainer)", "",
          table(results["train"], ["config", "losses", "dtypes", "finite", "seconds", "ok"]),
          "", "## One encoder layer, batch 1, width 768: milliseconds (median)", "",
          table(results["speed"], ["layer", "frames", "fwd_ms", "fwd+bwd_ms",
                                   "fwd+bwd vs attention", "peak_mib"]), ""]
    failed = [r.get("config") or r.get("bimamba_type") or r.get("dtype")
              for part in ("scan", "layers", "train") for r in results[part] if not r["ok"]]
    md.append(f"**Result: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}**")
    return "\n".join(md) + "\n", not failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU "
                 "(torch.cuda.is_available() is False); use --cpu-dry-run on a CPU")
    size = SIZES["cpu" if args.cpu_dry_run else "gpu"]
    kernels = reference_kernels() if args.cpu_dry_run else ops.dispatch.INSTALLED
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = dict(environment=environment(device))
    results["scan"] = scan_parity(kernels, device, size["scan"])
    results["layers"] = layer_parity(kernels, device, size)
    with tempfile.TemporaryDirectory() as work:
        results["train"] = train_updates(size, Path(work))
    results["speed"] = speed(device, size)
    results["seconds"] = time.time() - start
    md, ok = report(results, args.cpu_dry_run)
    (args.out / "gpu_check.md").write_text(md)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(md)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
