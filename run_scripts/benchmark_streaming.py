"""Per-chunk latency of StreamingEncoder on this CPU, and stream-vs-full-pass differences.

    .venv/bin/python run_scripts/benchmark_streaming.py [--seconds 10] [--threads 1]

For each causal model (random init: the base and tiny pretraining configs with
bimamba_type=none, Mamba-1 and Mamba-2, and the causal Transformer baseline causal_hubert; for
base extractor_mode=layer_norm, since a GroupNorm front-end cannot stream) and each chunk size
it streams the same audio and prints:
  per-chunk compute: median CPU ms (time.process_time: with one thread, what an idle machine
                     would take; robust to other load), median and 95th percentile wall ms of
                     forward_chunk (first 5 chunks skipped as warm-up);
                     RTF = total CPU time / audio duration
  lookahead:         the positional conv's algorithmic latency (frames wait for R later frames)
  max |stream - full|: against model.extract_features on the whole utterance (fp32)
  state MB:          the carried state at the end of the stream (Mamba: conv + SSM state,
                     constant; causal attention: the KV cache, growing with the stream)
A frame is available lookahead + (time to the end of its chunk) + compute after it is spoken.
Wall times depend on other load on a shared machine: compare rows of one run.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark_report import machine  # noqa: E402
from fairseq_mamba.inference.encode_long import build_from_config  # noqa: E402
from fairseq_mamba.inference.streaming import StreamingEncoder  # noqa: E402

CAUSAL = {"bimamba_type": "none"}
CONFIGS = {
    "base (12 x 768), causal": ("mamba_hubert_base_librispeech.yaml", {**CAUSAL, "extractor_mode": "layer_norm"}),
    "base Mamba-2 (12 x 768), causal": ("mamba2_hubert_causal_base_librispeech.yaml", {}),
    "base causal_hubert (12 x 768)": ("causal_hubert_base_librispeech.yaml", {}),
    "tiny (4 x 128), causal": ("mamba_hubert_tiny_cpu.yaml", CAUSAL),
    "tiny Mamba-2 (4 x 128), causal": ("mamba2_hubert_tiny_cpu.yaml", CAUSAL),
    "tiny causal_hubert (4 x 128)": ("causal_hubert_tiny_cpu.yaml", {}),
}
CHUNKS = [320, 1600, 3200, 16000]  # 20 ms (one frame), 100 ms, 200 ms, 1 s


def run(encoder, wav, chunk):
    """(per-chunk wall seconds, per-chunk CPU seconds, concatenated features) of one stream."""
    encoder.reset()
    walls, cpus, outs = [], [], []
    for start in range(0, wav.shape[-1], chunk):
        t0, c0 = time.perf_counter(), time.process_time()
        outs.append(encoder.forward_chunk(wav[:, start:start + chunk]))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    outs.append(encoder.flush())
    return walls, cpus, torch.cat(outs, dim=1)


def state_mb(encoder):
    """MB of the tensors the encoder's layers carry (nested tuples / dicts of tensors)."""
    def size(x):
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
        return sum(size(v) for v in values)
    return size(encoder._states) / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wav = torch.randn(1, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    print(f"Machine: {machine()}; {args.seconds:g} s of audio; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | chunk | per-chunk CPU ms median | wall ms median | wall ms p95 | RTF (CPU) | lookahead "
          "| max abs stream - full | state MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (config, overrides) in CONFIGS.items():
        if args.only not in name:
            continue
        model, _ = build_from_config(str(ROOT / "examples/pretrain" / config), seed=0, **overrides)
        encoder = StreamingEncoder(model)
        with torch.no_grad():
            full = model.extract_features(wav)[0]
        for chunk in CHUNKS:
            walls, cpus, out = run(encoder, wav, chunk)
            steady = sorted(walls[5:] or walls)
            p95 = steady[min(len(steady) - 1, int(0.95 * len(steady)))]
            diff = (out - full).abs().max().item()
            print(f"| {name} | {chunk} samples ({chunk / 16:g} ms) | {1e3 * statistics.median(cpus[5:] or cpus):.1f} | "
                  f"{1e3 * statistics.median(steady):.1f} | {1e3 * p95:.1f} | {sum(cpus) / args.seconds:.3f} | "
                  f"{encoder.lookahead_frames} frames ({1e3 * encoder.lookahead_seconds:g} ms) | {diff:.2e} | "
                  f"{state_mb(encoder):.2f} |")


if __name__ == "__main__":
    main()
