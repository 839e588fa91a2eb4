"""CPU benchmark of Mamba-2 (mamba_version=2) beside Mamba-1 and attention: the SSD scan and one
encoder layer, forward and forward+backward, 500-8000 frames, measured in one process.

    .venv/bin/python run_scripts/benchmark_mamba2.py [--lengths 500 1000 2000 4000 8000]
        [--attention-max 4000] [--threads 1]

Times: CPU seconds (time.process_time) with one thread, the minimum over up to 3 runs after a
first (benchmark.py's ``measure``); memory: peak RSS increase of the fwd+bwd call. Shapes:
  scan   batch 1; Mamba-1 selective scan: dim 1536, d_state 16 (benchmark.py's layer);
         Mamba-2 SSD: 24 heads x 64 (inner width 1536), d_state 64, 1 group, chunk 64.
  layer  batch 1, width 768, FFN 3072, MambaHubertConfig defaults (expand 2) with
         mamba_version=2, mamba_d_state=64, mamba_headdim=64 for Mamba-2; attention: fairseq's
         TransformerSentenceEncoderLayer (12 heads) and causal_hubert's causal layer. Attention
         fwd+bwd beyond --attention-max frames is skipped (8000 frames: ~12 GB, ~1 min).
The frame-by-frame SSD reference is timed once at the shortest length only.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import fwd_and_train, measure  # noqa: E402
from benchmark_report import machine  # noqa: E402
from fairseq_mamba.ops import selective_scan  # noqa: E402
from fairseq_mamba.ops.ssd_scan import ssd_scan_chunked, ssd_scan_reference  # noqa: E402


def scan_cases(length):
    """{name: (call, inputs, cotangent)} of the two scans at ``length`` frames."""
    g = torch.Generator().manual_seed(length)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).requires_grad_()  # noqa: E731
    d, n = 1536, 16
    mamba1 = dict(u=r(1, d, length), delta=r(1, d, length, s=0.5), A=-torch.exp(r(d, n)).detach().requires_grad_(),
                  B=r(1, n, length), C=r(1, n, length), D=r(d), z=r(1, d, length), delta_bias=r(d, s=0.3))
    h, p, n2 = 24, 64, 64
    ssd = dict(x=r(1, length, h, p), dt=r(1, length, h, s=0.5), A=-torch.rand(h).add(0.5).requires_grad_(),
               B=r(1, length, 1, n2), C=r(1, length, 1, n2), D=r(h), dt_bias=r(h, s=0.3))
    cases = {
        "Mamba-1 selective_scan (ours)": (lambda **kw: selective_scan(**kw, delta_softplus=True), mamba1,
                                          torch.randn(1, d, length, generator=g)),
        "Mamba-2 SSD chunked (ours)": (lambda **kw: ssd_scan_chunked(**kw, chunk_size=64, dt_softplus=True), ssd,
                                       torch.randn(1, length, h, p, generator=g)),
        "Mamba-2 SSD reference (loop)": (lambda **kw: ssd_scan_reference(**kw, dt_softplus=True), ssd,
                                         torch.randn(1, length, h, p, generator=g)),
    }
    return cases


def build_layers():
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer

    from fairseq_mamba.models.mamba_hubert import MambaHubertConfig
    from fairseq_mamba.modules import CausalTransformerLayer, build_mamba_encoder_layer

    attention = dict(embedding_dim=768, ffn_embedding_dim=3072, num_attention_heads=12, dropout=0.1,
                     attention_dropout=0.1, activation_dropout=0.0, activation_fn="gelu", layer_norm_first=False)
    layers = {"attention": TransformerSentenceEncoderLayer(**attention),
              "causal attention (causal_hubert)": CausalTransformerLayer(**attention),
              "Mamba-1 bimamba_type=none": build_mamba_encoder_layer(MambaHubertConfig(bimamba_type="none"))}
    for kind in ("none", "internal", "external"):
        layers[f"Mamba-2 bimamba_type={kind}"] = build_mamba_encoder_layer(MambaHubertConfig(
            bimamba_type=kind, mamba_version=2, mamba_d_state=64, mamba_headdim=64))
    return layers


def row(name, length, fwd, train):
    out = dict(name=name, length=length, fwd_s=measure(fwd, live=False)["s"])
    m = measure(train, live=False)
    out.update(train_s=m["s"], train_rss_mb=m["rss"] / 2**20)
    print("[row]", json.dumps(out), flush=True)
    return out


def table(rows, title):
    lengths = sorted({r["length"] for r in rows})
    get = {(r["name"], r["length"]): r for r in rows}
    lines = [f"### {title}", "", "| | mode | " + " | ".join(f"{n} frames" for n in lengths) + " |",
             "|---" * (len(lengths) + 2) + "|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        for mode, key, fmt in (("fwd s", "fwd_s", "{:.3g}"), ("fwd+bwd s", "train_s", "{:.3g}"),
                               ("fwd+bwd peak RSS MB", "train_rss_mb", "{:.0f}")):
            cells = [fmt.format(get[name, n][key]) if (name, n) in get else "-" for n in lengths]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--attention-max", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    scan_rows, layer_rows = [], []
    for length in args.lengths:
        for name, (call, inputs, cotangent) in scan_cases(length).items():
            if "reference" in name and length != args.lengths[0]:
                continue
            fwd, train = fwd_and_train(call, inputs, cotangent)
            scan_rows.append(row(name, length, fwd, train))
    for name, layer in build_layers().items():
        for length in args.lengths:
            if "attention" in name and length > args.attention_max:
                continue
            g = torch.Generator().manual_seed(length)
            x = torch.randn(length, 1, 768, generator=g).requires_grad_()
            fwd, train = fwd_and_train(lambda x, layer=layer: layer(x)[0], {"x": x},
                                       torch.randn(length, 1, 768, generator=g))
            layer.eval()
            fwd_only = measure(fwd, live=False)["s"]
            layer.train()
            m = measure(lambda: (train(), layer.zero_grad(set_to_none=True)), live=False)
            layer_rows.append(dict(name=name, length=length, fwd_s=fwd_only, train_s=m["s"],
                                   train_rss_mb=m["rss"] / 2**20))
            print("[row]", json.dumps(layer_rows[-1]), flush=True)
    print("\n".join([f"Machine: {machine()}; load average {load:.1f} at start, "
                     f"{os.getloadavg()[0]:.1f} at end.", ""]
                    + table(scan_rows, "SSD scan vs Mamba-1 selective scan (batch 1, inner width 1536)")
                    + table(layer_rows, "One encoder layer, batch 1, width 768")))


if __name__ == "__main__":
    main()
