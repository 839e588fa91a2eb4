"""CPU benchmarks: (a) the selective scan, (b) one encoder layer, Mamba vs attention.

    bash run_scripts/benchmark.sh [--quick]     (--quick: a ~1 minute smoke run)

Writes outputs/benchmarks/benchmark.{md,json,png}. What is measured:
  time    wall clock of one call, the minimum over the timed repetitions (after a
          first, untimed, run), at torch's default thread count. On a shared
          machine the minimum is the least disturbed run; the load is recorded.
  memory  peak resident-set increase of the process during one call: glibc's
          free pages are returned (malloc_trim), the kernel's high-water mark is
          reset (/proc/self/clear_refs), then VmHWM - VmRSS-before. It counts
          everything the call allocates: outputs, saved activations, gradients.
  fwd     forward under torch.no_grad(); fwd+bwd: forward with autograd, then
          backward of a fixed random cotangent (preallocated, not counted).
Runs that would take minutes or tens of GB (the Python-loop references and the
Blelloch scan at 4000 steps) are extrapolated linearly in length from the longest
measured length, and marked as such.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_mamba.ops import selective_scan, selective_scan_reference  # noqa: E402
from scan_baselines import blelloch_selective_scan, load_mamba_ssm_ref  # noqa: E402

SCAN_SHAPE = dict(batch=4, dim=1536, d_state=16)
LOOP_MAX_LEN = 1000  # Python-loop scans and Blelloch: longer lengths are extrapolated
_LIBC = ctypes.CDLL("libc.so.6")


# --------------------------------------------------------------------------- measuring
def _vm_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def measure(fn, max_reps=3, budget_s=3.0):
    """(min CPU seconds, min wall seconds, peak bytes) of fn().

    The first run gives the memory and warms up; then up to max_reps timed runs
    while they fit in budget_s (none: the first run is the timing).
    """
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _vm_kib("VmRSS")
    runs = [_timed(fn)]
    peak = (_vm_kib("VmHWM") - rss0) * 1024
    while len(runs) <= max_reps and runs[0][1] * len(runs) < budget_s:
        runs.append(_timed(fn))
    runs = runs[1:] or runs
    return min(r[0] for r in runs), min(r[1] for r in runs), peak


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def fwd_and_train(call, inputs, grad_out):
    """Closures for fwd (no_grad) and fwd+bwd of call(**inputs)."""
    def fwd():
        with torch.no_grad():
            call(**inputs)

    def train():
        call(**inputs).backward(grad_out)
        for t in inputs.values():  # dropped here, so the measured peak includes them
            t.grad = None

    return fwd, train


# ----------------------------------------------------------------------- (a) the scan
def scan_inputs(length, seed=0):
    """Mamba's layer-sized case: softplus(delta + bias), D and z, fp32; B, C (b, n, l)."""
    b, d, n = SCAN_SHAPE["batch"], SCAN_SHAPE["dim"], SCAN_SHAPE["d_state"]
    g = torch.Generator().manual_seed(seed)
    x = dict(u=torch.randn(b, d, length, generator=g),
             delta=torch.randn(b, d, length, generator=g) * 0.5 - 2.0,
             A=-torch.exp(torch.randn(d, n, generator=g)),
             B=torch.randn(b, n, length, generator=g), C=torch.randn(b, n, length, generator=g),
             D=torch.randn(d, generator=g), z=torch.randn(b, d, length, generator=g),
             delta_bias=torch.randn(d, generator=g) * 0.3)
    return {k: v.requires_grad_() for k, v in x.items()}, torch.randn(b, d, length, generator=g)


def scan_impls():
    impls = {"ours (chunked)": selective_scan, "our reference (loop)": selective_scan_reference}
    ref, why = load_mamba_ssm_ref()
    if ref is None:
        print(f"[benchmark] SKIPPING the mamba-ssm selective_scan_ref column: {why}")
    else:
        impls["mamba-ssm selective_scan_ref"] = ref
    impls["Blelloch pscan (mamba.py kind)"] = blelloch_selective_scan
    return impls


def bench_scan(lengths):
    rows = []
    for name, fn in scan_impls().items():
        call = lambda fn=fn, **kw: fn(**kw, delta_softplus=True)  # noqa: E731
        looped = not name.startswith("ours")
        for length in lengths:
            if looped and length > LOOP_MAX_LEN:
                continue
            inputs, grad_out = scan_inputs(length)
            fwd, train = fwd_and_train(call, inputs, grad_out)
            budget = 0.0 if looped else 3.0  # loops: the single first run is the timing
            row = dict(impl=name, length=length)
            row["fwd_s"], row["fwd_wall"], row["fwd_peak"] = measure(fwd, budget_s=budget)
            row["train_s"], row["train_wall"], row["train_peak"] = measure(train, budget_s=budget)
            row["io_bytes"] = sum(t.numel() * t.element_size() for t in inputs.values()) \
                + grad_out.numel() * 4  # + the output, same size as u
            rows.append(row)
            print("[scan]", json.dumps(row), flush=True)
        measured = [r for r in rows if r["impl"] == name]
        for length in lengths:  # the loops, extrapolated linearly in length
            if looped and length > LOOP_MAX_LEN and measured:
                last, scale = measured[-1], length / measured[-1]["length"]
                rows.append(dict(last, length=length, extrapolated=True,
                                 **{k: last[k] * scale for k in
                                    ("fwd_s", "fwd_wall", "fwd_peak", "train_s", "train_wall",
                                     "train_peak", "io_bytes")}))
    return rows


def bench_elementwise(length):
    """One elementwise pass over a (batch, dim, length, d_state) fp32 tensor."""
    shape = (SCAN_SHAPE["batch"], SCAN_SHAPE["dim"], length, SCAN_SHAPE["d_state"])
    x = torch.rand(shape) * -3
    y = torch.empty_like(x)
    out = {"mul_s": measure(lambda: torch.mul(x, 2.0, out=y), max_reps=5)[0],
           "exp_s": measure(lambda: torch.exp(x, out=y), max_reps=5)[0],
           "exp2_s": measure(lambda: torch.exp2(x, out=y), max_reps=5)[0]}
    print("[elementwise]", json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------- (b) the encoder layers
def build_layers():
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer

    from fairseq_mamba.models.mamba_hubert import MambaHubertConfig
    from fairseq_mamba.modules.mamba_layer import BIMAMBA_TYPES, build_mamba_encoder_layer

    layers = {"attention (TransformerSentenceEncoderLayer)": TransformerSentenceEncoderLayer(
        embedding_dim=768, ffn_embedding_dim=3072, num_attention_heads=12, dropout=0.1,
        attention_dropout=0.1, activation_dropout=0.0, activation_fn="gelu")}
    for kind in BIMAMBA_TYPES:
        layers[f"mamba bimamba_type={kind}"] = build_mamba_encoder_layer(
            MambaHubertConfig(bimamba_type=kind))
    return layers


def bench_layers(lengths):
    rows = []
    for name, layer in build_layers().items():
        def call(x, layer=layer):
            return layer(x, self_attn_padding_mask=None)[0]

        for length in lengths:
            g = torch.Generator().manual_seed(length)
            x = torch.randn(length, 1, 768, generator=g).requires_grad_()
            fwd, train = fwd_and_train(call, {"x": x}, torch.randn(length, 1, 768, generator=g))
            row = dict(layer=name, length=length)
            layer.eval()
            row["fwd_s"], row["fwd_wall"], row["fwd_peak"] = measure(fwd)
            layer.train()
            row["train_s"], row["train_wall"], row["train_peak"] = measure(
                lambda: (train(), layer.zero_grad(set_to_none=True)))
            rows.append(row)
            print("[layer]", json.dumps(row), flush=True)
    return rows


def loglog_slope(xs, ys):
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def bench_chunk_sweep(length, configs):
    """fwd+bwd time of our scan per (state chunk, io chunk): how they were chosen."""
    from fairseq_mamba.ops import chunked_scan

    inputs, grad_out = scan_inputs(length)
    default = chunked_scan.IO_CHUNK
    out = {}
    for chunk, io_chunk in configs:
        def call(u, delta, A, B, C, D, z, delta_bias, chunk=chunk):
            return chunked_scan.ChunkedSelectiveScan.apply(
                u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, True, chunk)[0]
        chunked_scan.IO_CHUNK = io_chunk
        try:
            cpu, _, peak = measure(fwd_and_train(call, inputs, grad_out)[1])
        finally:
            chunked_scan.IO_CHUNK = default
        out[f"{chunk}/{io_chunk}"] = dict(train_s=cpu, train_peak=peak)
    print("[chunk sweep]", json.dumps(out), flush=True)
    return out


# ------------------------------------------------------------------------------ report
def _mb(x):
    return f"{x / 2**20:.0f}"


def _t(row, key):
    return ("~" if row.get("extrapolated") else "") + f"{row[key]:.3g}"


def scan_report(rows, elementwise, sweep, ref_len):
    ours = {r["length"]: r for r in rows if r["impl"].startswith("ours")}
    lines = ["## (a) Selective scan", "",
             f"batch {SCAN_SHAPE['batch']}, dim {SCAN_SHAPE['dim']}, d_state "
             f"{SCAN_SHAPE['d_state']}, fp32, D + z + delta_bias + softplus. `~` = "
             "extrapolated linearly in length (not run). Speed-up = their time / ours.", "",
             "| length | implementation | fwd s | fwd+bwd s | ours faster (fwd / fwd+bwd) "
             "| peak fwd+bwd MB | peak / (inputs+outputs) |", "|---" * 7 + "|"]
    for r in sorted(rows, key=lambda r: r["length"]):
        o = ours[r["length"]]
        lines.append(f"| {r['length']} | {r['impl']} | {_t(r, 'fwd_s')} | {_t(r, 'train_s')} "
                     f"| {r['fwd_s'] / o['fwd_s']:.1f}x / {r['train_s'] / o['train_s']:.1f}x "
                     f"| {_mb(r['train_peak'])} | {r['train_peak'] / r['io_bytes']:.2f} |")
    o = ours[ref_len]
    lines += ["", "Targets (fwd+bwd at length %d):" % ref_len, ""]
    for r in rows:
        if r["length"] == ref_len and r["impl"].startswith("mamba-ssm"):
            x = r["train_s"] / o["train_s"]
            lines.append(f"- vs mamba-ssm `selective_scan_ref`: {x:.0f}x faster (target >= 100x: "
                         f"{'met' if x >= 100 else 'MISSED'})")
        if r["length"] == ref_len and r["impl"].startswith("Blelloch"):
            x = r["train_s"] / o["train_s"]
            lines.append(f"- vs Blelloch pscan: {x:.1f}x faster (target > 1x: "
                         f"{'met' if x > 1 else 'MISSED'})")
    ratio = o["train_peak"] / o["io_bytes"]
    lines.append(f"- peak memory {ratio:.2f}x inputs+outputs (target <= 2: "
                 f"{'met' if ratio <= 2 else 'MISSED'})")
    for op in ("mul", "exp", "exp2"):
        t = elementwise[op + "_s"]
        x = o["train_s"] / t
        lines.append(f"- fwd+bwd = {x:.1f} elementwise `{op}` passes over a (b, d, l, n) fp32 "
                     f"tensor ({t * 1e3:.1f} ms; aim <= 10: {'met' if x <= 10 else 'missed'})")
    lines += ["", f"Chunk sweep, ours fwd+bwd at length {ref_len} (state chunk / io chunk: "
              "CPU s, peak MB): " + ", ".join(f"{c}: {r['train_s']:.3f} s, {_mb(r['train_peak'])}"
                                              for c, r in sweep.items()), ""]
    return lines


def layer_report(rows):
    names = list(dict.fromkeys(r["layer"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    get = {(r["layer"], r["length"]): r for r in rows}
    attn = names[0]
    lines = ["## (b) One encoder layer, batch 1, dim 768 (T x B x C input)", "",
             "| layer | mode | " + " | ".join(f"{n} frames" for n in lengths)
             + " | log-log slope |", "|---" * (len(lengths) + 3) + "|"]
    for name in names:
        for mode, key in (("fwd s", "fwd_s"), ("fwd+bwd s", "train_s"),
                          ("fwd+bwd peak MB", "train_peak")):
            vals = [get[name, n][key] for n in lengths]
            cells = [f"{v:.3g}" if key != "train_peak" else _mb(v) for v in vals]
            slope = f"{loglog_slope(lengths, vals):.2f}" if len(lengths) > 1 else "-"
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {slope} |")
    lines += ["", "Targets (Mamba layers): log-log slope of fwd+bwd time <= 1.15; faster "
              "than attention (fwd+bwd) from 2000 frames up.", ""]
    for name in names[1:]:
        slope = loglog_slope(lengths, [get[name, n]["train_s"] for n in lengths]) \
            if len(lengths) > 1 else float("nan")
        speed = [f"{n}: {get[attn, n]['train_s'] / get[name, n]['train_s']:.2f}x"
                 for n in lengths if n >= 2000]
        ok = all(get[attn, n]["train_s"] > get[name, n]["train_s"] for n in lengths
                 if n >= 2000)
        lines.append(f"- {name}: slope {slope:.2f} ({'met' if slope <= 1.15 else 'MISSED'} by "
                     f"{abs(1.15 - slope):.2f}); attention time / this: "
                     f"{', '.join(speed) or 'n/a'} ({'met' if ok and speed else 'MISSED'})")
    return lines + [""]


def plot(scan_rows, layer_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, rows, key, title in ((axes[0], scan_rows, "impl", "(a) selective scan fwd+bwd"),
                                 (axes[1], layer_rows, "layer", "(b) encoder layer fwd+bwd")):
        for name in dict.fromkeys(r[key] for r in rows):
            pts = sorted((r["length"], r["train_s"], r.get("extrapolated", False))
                         for r in rows if r[key] == name)
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            ax.loglog([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "kx")
        ax.set(xlabel="length (frames)", ylabel="seconds", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine():
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in model.splitlines()
                  if ln.startswith("Model name")), "unknown CPU")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, no GPU used")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, multi-threaded "
                        "ops stall on descheduled threads and the timings become noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scan_lengths = [64] if args.quick else [250, 1000, 4000]
    layer_lengths = [128, 256] if args.quick else [500, 1000, 2000, 4000, 8000]
    ref_len = scan_lengths[0] if args.quick else 1000
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    start = time.time()
    elementwise = bench_elementwise(ref_len)
    sweep = bench_chunk_sweep(ref_len, [(16, 64)] if args.quick else
                              [(8, 64), (16, 16), (16, 32), (16, 64), (16, 128), (32, 64)])
    scan_rows = bench_scan(scan_lengths)
    layer_rows = bench_layers(layer_lengths)
    header = [f"# Benchmark{' (--quick)' if args.quick else ''}", "",
              *(["**--quick smoke run: short lengths, so the targets (defined at length 1000 "
                 "and 2000+ frames) are not meaningful here.**", ""] if args.quick else []),
              f"Machine: {machine()}. Load average (1 min) at start {load[0]:.1f}, at end "
              f"{os.getloadavg()[0]:.1f}; run took {time.time() - start:.0f} s.", "",
              "Times are CPU seconds of the process (`time.process_time`), the minimum over up "
              "to 3 repetitions after a first run (the single run for the Python-loop scans); "
              "with one thread that is the wall time of an idle machine, and other load "
              "cannot inflate it (wall times are in benchmark.json). Memory: peak RSS "
              "increase during one call (malloc_trim, VmHWM reset), outputs and gradients "
              "included.", ""]
    md = "\n".join(header + scan_report(scan_rows, elementwise, sweep, ref_len)
                   + layer_report(layer_rows))
    (out_dir / "benchmark.md").write_text(md)
    (out_dir / "benchmark.json").write_text(json.dumps(
        dict(scan=scan_rows, layers=layer_rows, elementwise=elementwise, chunk_sweep=sweep),
        indent=1))
    plot(scan_rows, layer_rows, out_dir / "benchmark.png")
    print(md)
    print(f"[benchmark] wrote {out_dir}/benchmark.md, .json, .png")


if __name__ == "__main__":
    main()
