"""Per-chunk latency of StreamingEncoder on this CPU, and stream-vs-full-pass differences.

    .venv/bin/python run_scripts/benchmark_streaming.py [--seconds 10] [--threads 1]

For each causal model (random init: the base and tiny pretraining configs with
bimamba_type=none, and for base extractor_mode=layer_norm, since a GroupNorm front-end cannot
stream) and each chunk size it streams the same audio and prints:
  per-chunk compute: median CPU ms (time.process_time: with one thread, what an idle machine
                     would take; robust to other load), median and 95th percentile wall ms of
                     forward_chunk (first 5 chunks skipped as warm-up);
                     RTF = total CPU time / audio duration
  lookahead:         the positional conv's algorithmic latency (frames wait for R later frames)
  max |stream - full|: against model.extract_features on the whole utterance (fp32)
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
from fairseq_mamba.encode_long import build_from_config  # noqa: E402
from fairseq_mamba.streaming import StreamingEncoder  # noqa: E402

CONFIGS = {
    "base (12 x 768), causal": ("mamba_hubert_base_librispeech.yaml", {"extractor_mode": "layer_norm"}),
    "tiny (4 x 128), causal": ("mamba_hubert_tiny_cpu.yaml", {}),
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wav = torch.randn(1, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    print(f"Machine: {machine()}; {args.seconds:g} s of audio; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | chunk | per-chunk CPU ms median | wall ms median | wall ms p95 | RTF (CPU) | lookahead "
          "| max abs stream - full |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (config, overrides) in CONFIGS.items():
        model, _ = build_from_config(str(ROOT / "examples/pretrain" / config), seed=0,
                                     bimamba_type="none", **overrides)
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
                  f"{encoder.lookahead_frames} frames ({1e3 * encoder.lookahead_seconds:g} ms) | {diff:.2e} |")


if __name__ == "__main__":
    main()
