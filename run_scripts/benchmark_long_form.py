"""Long-form encoding: peak memory and time of encode_long against a one-pass encoding.

    .venv/bin/python run_scripts/benchmark_long_form.py [--quick] [--cap-gb 8]

Every measurement is a fresh subprocess with one torch thread on the same audio file (the
bundled corpus' speech, tiled to the length), randomly initialised BASE models:
  hubert one pass        stock HuBERT Base (hubert_base_librispeech.yaml):
                         model.extract_features(wav) under no_grad, as fairseq encodes a file
  mamba_hubert one pass  mamba_hubert Base (external BiMamba), the same call
  mamba_hubert encode_long / hubert encode_long
                         python -m fairseq_mamba.inference.encode_long CONFIG AUDIO OUT --layers 6 12
Peak RSS is the subprocess' own maximum resident set (os.wait4's ru_maxrss), so it includes
the interpreter, torch and the model (about 0.7-0.8 GB). Time: the encoding's CPU seconds
(time.process_time: with one thread, the wall time of an idle machine, and robust to other
load) and wall seconds, as the subprocess reports them (model building and audio reading
excluded; encode_long includes writing its .npy files), and the whole subprocess' wall time.
A run whose address space would pass --cap-gb is stopped by the kernel (RLIMIT_AS) and shows
as "over cap": the cap protects the shared machine; where that happens is reported, not what
the run would need.
Slopes: log-log slope of CPU time and of (RSS - RSS of the model alone) between the two
longest lengths that ran; for the one-pass runs also least-squares fits (RSS linear, CPU time
a L + b L^2) and what they predict where a run was stopped. Raw rows: outputs/benchmarks/
long_form.json. The machine may be shared: compare rows of one run.
"""
import argparse
import glob
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchmark_report import machine

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"hubert": "hubert_base_librispeech.yaml", "mamba_hubert": "mamba_hubert_base_librispeech.yaml"}
FULL = {  # case -> lengths in seconds
    ("hubert", "one pass"): [30, 60, 120, 240, 600],
    ("mamba_hubert", "one pass"): [60, 240, 600],
    ("mamba_hubert", "encode_long"): [30, 60, 120, 240, 600, 1200],
    ("hubert", "encode_long"): [60, 240],
}
QUICK = {case: [10, 20] for case in FULL}


def make_audio(seconds, path):
    """The corpus' training utterances, concatenated and tiled to ``seconds``, 16 kHz mono."""
    files = sorted(glob.glob(str(ROOT / "examples/corpus/data/train/*.flac")))
    pieces, total, need = [], 0, int(seconds * 16000)
    while total < need:
        for f in files:
            wav, _ = sf.read(f, dtype="float32")
            pieces.append(wav)
            total += len(wav)
            if total >= need:
                break
    sf.write(path, np.concatenate(pieces)[:need], 16000, subtype="FLOAT")


def one_pass_worker(model_name, audio):
    """Subprocess body: build the model, read the file, one extract_features call; print JSON."""
    import torch

    from fairseq_mamba.inference.encode_long import load_model, read_audio

    torch.set_num_threads(1)
    model, _ = load_model(str(ROOT / "examples/pretrain" / CONFIGS[model_name]))
    wav = read_audio(audio)
    start, cpu = time.time(), time.process_time()
    with torch.no_grad():
        frames = model.extract_features(wav[None])[0].shape[1]
    print(json.dumps({"frames": frames, "encode_seconds": time.time() - start,
                      "encode_cpu_seconds": time.process_time() - cpu}))


def model_only_worker(model_name):
    import torch

    from fairseq_mamba.inference.encode_long import load_model

    torch.set_num_threads(1)
    load_model(str(ROOT / "examples/pretrain" / CONFIGS[model_name]))


def measure(cmd, cap_gb):
    """Run cmd in a subprocess capped at cap_gb of address space: (rc, wall s, peak RSS MB, output)."""
    def limit():
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        log.seek(0)
        output = log.read()
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, output


def slope(rows, key, base=0.0):
    ok = [r for r in rows if r["rc"] == 0]
    if len(ok) < 2:
        return "-"
    a, b = ok[-2], ok[-1]
    return f"{math.log((b[key] - base) / (a[key] - base)) / math.log(b['seconds'] / a['seconds']):.2f}"


def fits(rows, base_mb, total_mb):
    """Least-squares fits over the runs that finished: RSS = base + m L, CPU time = a L + b L^2.
    Returns a line with m, where RSS would reach total_mb, a and b, and the predicted times of
    the runs that did not finish and of 600 s."""
    ok = [r for r in rows if r["rc"] == 0]
    if len(ok) < 2:
        return "too few finished runs to fit"
    L = np.array([r["seconds"] for r in ok], dtype=float)
    m = float(L @ (np.array([r["rss"] for r in ok]) - base_mb) / (L @ L))
    (a, b), *_ = np.linalg.lstsq(np.stack([L, L ** 2], 1), np.array([r["cpu"] for r in ok]), rcond=None)
    targets = sorted({r["seconds"] for r in rows if r["rc"] != 0} | {600})
    predicted = ", ".join(f"{t} s -> {a * t + b * t * t:.0f} CPU s, {base_mb + m * t:.0f} MB" for t in targets)
    return (f"RSS = model alone + {m:.1f} MB per audio second (reaches this machine's "
            f"{total_mb / 1024:.0f} GiB at {(total_mb - base_mb) / m:.0f} s of audio); CPU s = "
            f"{a:.3g} L + {b:.3g} L^2; extrapolated: {predicted}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10 and 20 s only (smoke run)")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="address-space cap per run")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started, load0 = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="long_form_"))
    py = sys.executable
    baseline = {}
    for name in CONFIGS:
        rc, _, rss, out = measure([py, __file__, "--model-only", name], args.cap_gb)
        assert rc == 0, out[-2000:]
        baseline[name] = rss
    results = {}
    for (name, method), lengths in plan.items():
        rows = results.setdefault(f"{name} {method}", [])
        for seconds in lengths:
            audio = work / f"audio_{seconds}.wav"
            if not audio.exists():
                make_audio(seconds, audio)
            if method == "one pass":
                cmd = [py, __file__, "--one-pass", name, str(audio)]
            else:
                cmd = [py, "-m", "fairseq_mamba.inference.encode_long", str(ROOT / "examples/pretrain" / CONFIGS[name]),
                       str(audio), str(work / "out"), "--layers", "6", "12", "--threads", "1", "--no-progress"]
            rc, wall, rss, out = measure(cmd, args.cap_gb)
            over = rc != 0 and ("can't allocate" in out or "MemoryError" in out or "std::bad_alloc" in out)
            timing = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
            rows.append({"seconds": seconds, "rc": rc, "wall": wall, "rss": rss,
                         "encode": timing.get("encode_seconds", float("nan")),
                         "cpu": timing.get("encode_cpu_seconds", float("nan")),
                         "status": "ok" if rc == 0 else ("over cap" if over else f"failed rc={rc}")})
            print(f"{name} {method} {seconds}s: {rows[-1]['status']} {rows[-1]['cpu']:.1f} cpu s "
                  f"{wall:.1f} s {rss:.0f} MB", file=sys.stderr)
            if rc != 0 and not over:
                print(out[-3000:], file=sys.stderr)
            if rc != 0:
                break  # longer lengths cannot fit either
    torch.set_num_threads(1)  # as every measured subprocess; only for machine()'s line
    print(f"Machine: {machine()}; address-space cap {args.cap_gb:g} GiB per run; load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; {time.time() - started:.0f} s in all.\n")
    print("Model alone (interpreter, torch, random-init model): " +
          ", ".join(f"{k} {v:.0f} MB" for k, v in baseline.items()) + "\n")
    print("| model | method | audio | peak RSS MB | encode CPU s | encode wall s | process wall s | status |")
    print("|---|---|---|---|---|---|---|---|")
    for case, rows in results.items():
        name, method = case.split(" ", 1)
        for r in rows:
            rss = f"{r['rss']:.0f}" if r["rc"] == 0 else f"({r['rss']:.0f} when stopped)"
            print(f"| {name} | {method} | {r['seconds']} s | {rss} | {r['cpu']:.1f} | {r['encode']:.1f} | "
                  f"{r['wall']:.1f} | {r['status']} |")
    print("\n| model | method | encode CPU time slope | memory slope (above model alone) |")
    print("|---|---|---|---|")
    for case, rows in results.items():
        name, method = case.split(" ", 1)
        print(f"| {name} | {method} | {slope(rows, 'cpu')} | {slope(rows, 'rss', baseline[name])} |")
    with open("/proc/meminfo") as f:
        total_mb = int(f.readline().split()[1]) / 1024
    print("\nFits (extrapolations are not measurements):\n")
    for case, rows in results.items():
        if case.endswith("one pass"):
            print(f"- {case}: {fits(rows, baseline[case.split()[0]], total_mb)}")
    out = ROOT / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_form.json").write_text(json.dumps({"baseline_mb": baseline, "results": results}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one-pass":
        one_pass_worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--model-only":
        model_only_worker(sys.argv[2])
    else:
        main()
