"""CPU benchmarks: (a) the selective scan, (b) one encoder layer, Mamba vs attention,
(c) training seconds per update of the tiny configs, (d) one update of the base configs
(both in benchmark_training.py).
"ours (kernel)" is the compiled CPU scan (ops/scan_kernel.py) that selective_scan uses;
"ours (chunked)" the eager fallback.

    bash run_scripts/benchmark.sh [--quick] [--threads N]   (--quick: ~1 minute smoke run)

Writes outputs/benchmarks/benchmark.{md,json,png}. What is measured:
  time    CPU seconds of the process (time.process_time), the minimum over up to 3
          repetitions after a first run; with one thread (the default) this is the
          wall time on an idle machine and other load on a shared machine cannot
          inflate it. Wall times are kept in benchmark.json.
  memory  live: peak bytes of live tensors during one call, from the allocation
          and free events of torch.profiler(profile_memory=True): exact and
          independent of the allocator. rss: peak resident-set increase during
          one (unprofiled) call: free pages returned (malloc_trim), the kernel's
          high-water mark reset (/proc/self/clear_refs), then VmHWM - VmRSS before;
          it adds allocator overhead and fragmentation. Both count everything the
          call allocates: outputs, saved activations, gradients.
  fwd     forward under torch.no_grad(); fwd+bwd: forward with autograd, then
          backward of a fixed random cotangent (preallocated, not counted).
The Python-loop scans are timed by a single run. Runs that would take
tens of minutes or tens of GB (the loops and the Blelloch scan at 4000 steps) are
extrapolated with the log-log slope between the two longest measured lengths, and
marked as such.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_mamba.ops import selective_scan_reference  # noqa: E402
from fairseq_mamba.ops.chunked_scan import CHUNK, ChunkedSelectiveScan  # noqa: E402
from fairseq_mamba.ops.scan_kernel import KernelSelectiveScan, load_kernel  # noqa: E402
from benchmark_report import (  # noqa: E402
    SCAN_SHAPE,
    layer_report,
    machine,
    plot,
    scan_report,
    threads_report,
    tiny_layer_report,
)
from benchmark_training import (  # noqa: E402
    base_update_report, bench_base_update, bench_training, training_report)
from scan_baselines import blelloch_selective_scan, load_mamba_ssm_ref  # noqa: E402
LOOP_MAX_LEN = 1000  # Python-loop scans and Blelloch: longer lengths are extrapolated
_LIBC = ctypes.CDLL("libc.so.6")


# --------------------------------------------------------------------------- measuring
def _vm_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def measure(fn, single=False, live=True, max_reps=3, budget_s=3.0):
    """{s, wall, rss, live} of fn(): min CPU and wall seconds, peak RSS increase and
    peak live tensor bytes (None when not profiled).

    A first run gives rss and warms up (single: it is also the timing); a
    profiled run gives live; then up to max_reps timed runs within budget_s.
    """
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _vm_kib("VmRSS")
    first = _timed(fn)
    rss = (_vm_kib("VmHWM") - rss0) * 1024
    peak = _profiled(fn) if live else None
    runs = []
    while not single and len(runs) < max_reps and first[1] * (len(runs) + 1) < budget_s:
        runs.append(_timed(fn))
    runs = runs or [first]
    return dict(s=min(r[0] for r in runs), wall=min(r[1] for r in runs), rss=rss, live=peak)


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _profiled(fn):
    """Peak live tensor bytes of one run of fn under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # +bytes per allocation, -bytes per free
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


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


def kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return KernelSelectiveScan.apply(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z,
                                     delta_bias, delta_softplus)[0]


def chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return ChunkedSelectiveScan.apply(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z,
                                      delta_bias, delta_softplus, CHUNK)[0]


FAST = ("ours (kernel)", "ours (chunked)")


def scan_impls():
    if load_kernel() is None:
        raise RuntimeError("the CPU selective-scan kernel did not build: see the warning above")
    impls = {"ours (kernel)": kernel_scan, "ours (chunked)": chunked_scan,
             "our reference (loop)": selective_scan_reference}
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
        looped = name not in FAST
        for length in lengths:
            if looped and length > LOOP_MAX_LEN:
                continue
            inputs, grad_out = scan_inputs(length)
            fwd, train = fwd_and_train(call, inputs, grad_out)
            row = dict(impl=name, length=length, io_bytes=sum(
                t.numel() * t.element_size() for t in inputs.values()) + grad_out.numel() * 4)
            # The profiler slows mamba-ssm's per-step autograd graph >10x: RSS only.
            live = not name.startswith("mamba-ssm")
            for mode, fn_ in (("fwd", fwd), ("train", train)):  # io: inputs + the output
                row.update({f"{mode}_{k}": v for k, v in
                            measure(fn_, single=looped, live=live).items()})
            rows.append(row)
            print("[scan]", json.dumps(row), flush=True)
        rows += _extrapolate([r for r in rows if r["impl"] == name],
                             [n for n in lengths if looped and n > LOOP_MAX_LEN])
    return rows


def _extrapolate(measured, lengths):
    """Rows at ``lengths`` from the log-log slope of the two longest measured ones."""
    if not measured:
        return []
    last, prev = measured[-1], measured[-2] if len(measured) > 1 else None
    out = []
    for length in lengths:
        row = dict(last, length=length, extrapolated=True)
        for k, v in last.items():
            if k.endswith(("_s", "_wall", "_rss", "_live", "_bytes")) and v is not None:
                slope = 1.0 if prev is None else math.log(v / prev[k]) / math.log(
                    last["length"] / prev["length"])
                row[k] = v * (length / last["length"]) ** slope
        out.append(row)
    return out


def _min_time(fn, reps=5):
    fn()
    return min(_timed(fn)[0] for _ in range(reps))


def bench_elementwise(length):
    """One elementwise pass over a (batch, dim, length, d_state) fp32 tensor."""
    shape = (SCAN_SHAPE["batch"], SCAN_SHAPE["dim"], length, SCAN_SHAPE["d_state"])
    x = torch.rand(shape) * -3
    y = torch.empty_like(x)
    out = {f"{op.__name__}_s": _min_time(lambda op=op: op(x, out=y))
           for op in (torch.neg, torch.exp, torch.exp2)}
    print("[elementwise]", json.dumps(out), flush=True)
    return out


def bench_scan_threads(length, threads=(1, 2)):
    """Wall seconds of kernel and chunked fwd+bwd at ``length`` per torch thread count
    (wall, not CPU: CPU seconds add up over threads)."""
    inputs, grad_out = scan_inputs(length)
    before, out = torch.get_num_threads(), {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            for name in FAST:
                fn = scan_impls()[name]
                train = fwd_and_train(lambda fn=fn, **kw: fn(**kw, delta_softplus=True),
                                      inputs, grad_out)[1]
                out[f"{name}, {n} thread{'s' * (n > 1)}"] = measure(train, live=False)["wall"]
    finally:
        torch.set_num_threads(before)
    print("[scan threads]", json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------- (b) the encoder layers
def build_tiny_layers():
    """The tiny CPU configs' layers (examples/pretrain/*_tiny_cpu.yaml): width 128;
    hubert's attention layer (4 heads, FFN 512), mamba_hubert's (expand 1, FFN 256)."""
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer

    from fairseq_mamba.models.mamba_hubert import MambaHubertConfig
    from fairseq_mamba.modules.mamba_layer import BIMAMBA_TYPES, build_mamba_encoder_layer

    layers = {"attention (TransformerSentenceEncoderLayer)": TransformerSentenceEncoderLayer(
        embedding_dim=128, ffn_embedding_dim=512, num_attention_heads=4, dropout=0.1,
        attention_dropout=0.1, activation_dropout=0.0, activation_fn="gelu")}
    for kind in BIMAMBA_TYPES:
        layers[f"mamba bimamba_type={kind}"] = build_mamba_encoder_layer(MambaHubertConfig(
            bimamba_type=kind, encoder_embed_dim=128, encoder_ffn_embed_dim=256,
            mamba_expand=1))
    return layers


def bench_tiny_layers(batch=8, length=156, rounds=15):
    """fwd+bwd CPU seconds of each tiny layer on a (length, batch, 128) input: the minimum
    over ``rounds`` rounds that time every layer once in turn (interleaved, so that a slow
    spell of a shared machine hits all layers alike rather than one)."""
    steps = {}
    for name, layer in build_tiny_layers().items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(length, batch, 128, generator=g).requires_grad_()
        train = fwd_and_train(lambda x, layer=layer: layer(x, self_attn_padding_mask=None)[0],
                              {"x": x}, torch.randn(length, batch, 128, generator=g))[1]
        layer.train()
        steps[name] = lambda train=train, layer=layer: (train(), layer.zero_grad(set_to_none=True))
        steps[name]()  # first-call costs
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_timed(step)[0])
    out = {name: min(t) for name, t in times.items()}
    print("[tiny layers]", json.dumps(out), flush=True)
    return out


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
            # A larger repetition budget than the scan's: the 2000-frame comparison
            # with attention is close, and one run can be 20% off another.
            layer.eval()
            row.update({f"fwd_{k}": v for k, v in measure(fwd, budget_s=8.0).items()})
            layer.train()
            row.update({f"train_{k}": v for k, v in measure(
                lambda: (train(), layer.zero_grad(set_to_none=True)), budget_s=8.0).items()})
            rows.append(row)
            print("[layer]", json.dumps(row), flush=True)
    return rows


def bench_chunk_sweep(length, configs):
    """fwd+bwd time of our scan per (state chunk, io chunk): how they were chosen."""
    from fairseq_mamba.ops import chunked_scan

    inputs, grad_out = scan_inputs(length)
    small = scan_inputs(16)
    default = chunked_scan.IO_CHUNK
    out = {}
    for chunk, io_chunk in configs:
        def call(u, delta, A, B, C, D, z, delta_bias, chunk=chunk):
            return chunked_scan.ChunkedSelectiveScan.apply(
                u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, True, chunk)[0]
        chunked_scan.IO_CHUNK = io_chunk
        try:
            fwd_and_train(call, *small)[1]()  # process-level first-call costs
            out[f"{chunk}/{io_chunk}"] = measure(fwd_and_train(call, inputs, grad_out)[1])
        finally:
            chunked_scan.IO_CHUNK = default
    print("[chunk sweep]", json.dumps(out), flush=True)
    return out


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
    threads = bench_scan_threads(ref_len)
    tiny = bench_tiny_layers()
    layer_rows = bench_layers(layer_lengths)
    training = bench_training(out_dir, args.quick, args.threads)
    base_update = bench_base_update(frames=(25,) if args.quick else (250, 1000),
                                    rounds=1 if args.quick else 3)
    header = [f"# Benchmark{' (--quick)' if args.quick else ''}", "",
              *(["**--quick smoke run: short lengths, so the targets (defined at length 1000 "
                 "and 2000+ frames) are not meaningful here.**", ""] if args.quick else []),
              f"Machine: {machine()}. Load average (1 min) at start {load[0]:.1f}, at end "
              f"{os.getloadavg()[0]:.1f}; run took {time.time() - start:.0f} s.", "",
              "Times: CPU seconds (`time.process_time`), minimum over up to 3 repetitions "
              "after a first run (the single run for the Python-loop scans); with one thread "
              "this is the wall time of an idle machine and other load cannot inflate it "
              "(wall times: benchmark.json). Memory, outputs and gradients included: peak "
              "live tensor bytes (torch.profiler memory events; not profiled for mamba-ssm's "
              "reference, which the profiler slows >10x) and peak RSS increase "
              "(malloc_trim, VmHWM reset; adds allocator overhead).", ""]
    md = "\n".join(header + scan_report(scan_rows, elementwise, sweep, ref_len)
                   + threads_report(threads, ref_len) + tiny_layer_report(tiny)
                   + layer_report(layer_rows) + training_report(training)
                   + base_update_report(base_update))
    (out_dir / "benchmark.md").write_text(md)
    (out_dir / "benchmark.json").write_text(json.dumps(
        dict(scan=scan_rows, layers=layer_rows, elementwise=elementwise, chunk_sweep=sweep,
             training=training, scan_threads=threads, tiny_layers=tiny,
             base_update=base_update),
        indent=1))
    plot(scan_rows, layer_rows, out_dir / "benchmark.png")
    print(md)
    print(f"[benchmark] wrote {out_dir}/benchmark.md, .json, .png")


if __name__ == "__main__":
    main()
