"""Markdown tables and the log-log plot of run_scripts/benchmark.py's results."""

import math
import os
import subprocess

import torch

SCAN_SHAPE = dict(batch=4, dim=1536, d_state=16)


def loglog_slope(xs, ys):
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _mb(x):
    return f"{x / 2**20:.0f}"


def _t(row, key):
    return ("~" if row.get("extrapolated") else "") + f"{row[key]:.3g}"


def _mem(row, key):
    v = row[key]
    return "-" if v is None else f"{_mb(v)} ({v / row['io_bytes']:.2f})"


def _verdict(ok, met="met", missed="MISSED"):
    return met if ok else missed


def scan_report(rows, elementwise, sweep, ref_len):
    ours = {r["length"]: r for r in rows if r["impl"] == "ours (kernel)"}
    chunked = {r["length"]: r for r in rows if r["impl"] == "ours (chunked)"}
    lines = ["## (a) Selective scan", "",
             f"batch {SCAN_SHAPE['batch']}, dim {SCAN_SHAPE['dim']}, d_state "
             f"{SCAN_SHAPE['d_state']}, fp32, D + z + delta_bias + softplus. `~` = "
             "extrapolated (not run). Ours faster = their time / ours. Memory of fwd+bwd "
             "as MB and as a multiple of inputs+outputs (u, delta, z, A, B, C, D, "
             "delta_bias, out).", "",
             "| length | implementation | fwd s | fwd+bwd s | ours faster (fwd / fwd+bwd) "
             "| peak live tensors MB (x) | peak RSS MB (x) |", "|---" * 7 + "|"]
    for r in sorted(rows, key=lambda r: r["length"]):
        o = ours[r["length"]]
        lines.append(f"| {r['length']} | {r['impl']} | {_t(r, 'fwd_s')} | {_t(r, 'train_s')} "
                     f"| {r['fwd_s'] / o['fwd_s']:.1f}x / {r['train_s'] / o['train_s']:.1f}x "
                     f"| {_mem(r, 'train_live')} | {_mem(r, 'train_rss')} |")
    o = ours[ref_len]
    lines += ["", f"Targets (fwd+bwd at length {ref_len}):", ""]
    x = chunked[ref_len]["train_s"] / o["train_s"]
    lines.append(f"- kernel {x:.2f}x faster than the chunked scan (target >= 3.4x: "
                 f"{_verdict(x >= 3.4)})")
    for r in rows:
        if r["length"] == ref_len and r["impl"].startswith(("mamba-ssm", "Blelloch")):
            x = r["train_s"] / o["train_s"]
            want = 100 if r["impl"].startswith("mamba-ssm") else 1
            lines.append(f"- {x:.1f}x faster than {r['impl']} (target > {want}x: "
                         f"{_verdict(x > want)})")
    for key, what in (("train_live", "live tensors"), ("train_rss", "RSS")):
        ratio = o[key] / o["io_bytes"]
        lines.append(f"- peak memory ({what}) {ratio:.2f}x inputs+outputs (target <= 2: "
                     f"{_verdict(ratio <= 2)})")
    for op in ("neg", "exp", "exp2"):
        t = elementwise[op + "_s"]
        x = o["train_s"] / t
        xc = chunked[ref_len]["train_s"] / t
        lines.append(f"- fwd+bwd = {x:.1f} elementwise passes (chunked: {xc:.1f}) "
                     f"(`torch.{op}(x, out=y)`, {t * 1e3:.1f} ms) over a (b, d, l, n) fp32 "
                     f"tensor (target <= 5: {_verdict(x <= 5)})")
    lines += ["", f"Chunk sweep, ours fwd+bwd at length {ref_len} (state chunk / io chunk: "
              "CPU s, peak live MB): " + ", ".join(
                  f"{c}: {r['s']:.3f} s, {_mb(r['live'])}" for c, r in sweep.items()), ""]
    return lines


def threads_report(threads, ref_len):
    lines = [f"Scan fwd+bwd at length {ref_len}, wall seconds by torch threads: "
             + ", ".join(f"{k}: {v:.3f} s" for k, v in threads.items()), ""]
    return lines


def tiny_layer_report(tiny):
    attn_name = next(iter(tiny))
    attn = tiny[attn_name]
    lines = ["## (b0) One encoder layer at the tiny configs' shape", "",
             "Width 128, batch 8 x 156 frames (T x B x C), fwd+bwd CPU seconds: attention as "
             "hubert_tiny_cpu (4 heads, FFN 512), Mamba as mamba_hubert_tiny_cpu (expand 1, "
             "FFN 256); the minimum over 15 rounds that time every layer in turn. Target: no "
             "Mamba layer slower than attention.", "",
             "| layer | fwd+bwd s | relative to attention |", "|---|---|---|"]
    for name, s in tiny.items():
        verdict = "" if name == attn_name else " " + _verdict(s <= attn)
        lines.append(f"| {name} | {s:.4f} | {s / attn:.2f}x{verdict} |")
    return lines + [""]


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
                          ("fwd+bwd peak live MB", "train_live"),
                          ("fwd+bwd peak RSS MB", "train_rss")):
            vals = [get[name, n][key] for n in lengths]
            cells = [f"{v:.3g}" if key.endswith("_s") else _mb(v) for v in vals]
            slope = f"{loglog_slope(lengths, vals):.2f}" if len(lengths) > 1 else "-"
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {slope} |")
    lines += ["", "Targets (Mamba layers): log-log slope of fwd+bwd time <= 1.15; no slower "
              "than attention (fwd+bwd) from 1000 frames up.", ""]
    for name in names[1:]:
        slope = loglog_slope(lengths, [get[name, n]["train_s"] for n in lengths]) \
            if len(lengths) > 1 else float("nan")
        long = [n for n in lengths if n >= 1000]
        ratios = {n: get[attn, n]["train_s"] / get[name, n]["train_s"] for n in long}
        speed = (_verdict(all(x >= 1 for x in ratios.values())) + " (attention time / this: "
                 + ", ".join(f"{n}: {x:.2f}x" for n, x in ratios.items()) + ")"
                 if long else "not measured (no length >= 1000)")
        lines.append(f"- {name}: slope {slope:.2f}, {_verdict(slope <= 1.15)} (limit 1.15, "
                     f"margin {1.15 - slope:+.2f}); no slower than attention from 1000: {speed}")
    return lines + [""]


def plot(scan_rows, layer_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    scan_title = "(a) selective scan fwd+bwd (x: extrapolated)"
    for ax, rows, key, title in ((axes[0], scan_rows, "impl", scan_title),
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
