"""Layer-wise mutual information of HuBERT-family checkpoints (issue #5), the paper's analysis.

    python -m fairseq_mamba.analysis.layer_mi --manifest DATA/test.tsv --out DIR \\
        [--kmeans KM.bin | --units LABELS.km] [--phones LABELS.phn] [NAME=]CHECKPOINT ...

For each checkpoint (mamba_hubert or stock hubert, loaded with fairseq's
``load_model_ensemble_and_task``) every layer k = 0..L (0 = the encoder input, see
:mod:`.layer_features`) is paired, frame by frame over the valid frames of every manifest
utterance, with four targets:

* ``layer0``: layer 0's own k-means code c0 (``--layer0-codes`` cells of its top principal
  components, fitted per model; :mod:`.reconstruction` says why not layer 0 itself), the paper's
  "reconstruction" view: I(layer k; c0) <= H(c0), reached by any layer c0 can be read back from;
* ``mfcc``: the 39-d MFCC input (fairseq's MfccFeatureReader), the frame with the same window;
* ``units``: k-means units, either applied here to that MFCC frame (``--kmeans``, the
  iteration-1 MFCC k-means of run_scripts/03, common to every model) or read from a label file
  (``--units``, one line per manifest row, 100 Hz or the model's rate);
* ``phones``: frame phone labels (``--phones``, e.g. examples/corpus/data/test.phn, 100 Hz);
* ``input`` (only when asked for, ``--targets ... input``): layer 0 itself, the seed paper's own
  procedure (:mod:`.utterance_mine`: MINE-DV per utterance, in-sample, averaged over utterances).

Checkpoints: pre-trained hubert / mamba_hubert, fine-tuned or from-scratch hubert_ctc (its
encoder), hubert_ctc_head (encoder layers, then head layers, on one axis: "encoder_layers" and
"head_layers" in the JSON) and hubert_enhancer (the reconstruction model's encoder); see
:func:`.layer_features.encoder_model`.

Estimators per target are fixed in ``ESTIMATORS`` (chosen by the validation in
:mod:`.validate_estimators`). Every layer of a model uses the same seed, hence the same
utterance-level splits, with fresh critics: differences between layers are paired comparisons.
Writes DIR/layer_mi.csv (one row per model, layer and target), DIR/layer_mi.json (per model,
one list per target with one value per layer, index = layer, plus "std", "layer0_entropy" =
H(c0) and "layer0_null" = the layer-0 estimate against permuted codes) and DIR/layer_mi.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .layer_features import (PHONE_WIN, UNIT_WIN, FrameGeometry, Utterance, encoder_model, extract_layers,
                             head_layers, kmeans_units, load_checkpoint, read_audio, read_labels, read_manifest,
                             read_mfcc)
from .mi_plots import plot_layer_mi
from .mutual_information import MIEstimate, entropy_miller_madow, estimate_mi
from .reconstruction import N_CODES, PCA, layer0_codes, permuted

TARGETS = ("layer0", "mfcc", "units", "phones", "input")
DEFAULT_TARGETS = TARGETS[:4]
# target -> (method, options), chosen by `python -m fairseq_mamba.analysis.validate_estimators`
# (numbers in the README): InfoNCE on the top 32 principal components for every target (layer0's
# target is discrete too: layer 0's k-means code, see .reconstruction). "input" is the seed paper's
# own procedure (.utterance_mine): layer 0 itself, MINE-DV per utterance, in-sample, averaged.
_INFONCE = dict(pca=PCA, hidden=64, embed=64, batch_size=256, lr=3e-3, max_steps=1000, eval_every=25)
ESTIMATORS: Dict[str, Tuple[str, Dict]] = {target: ("infonce", _INFONCE) for target in DEFAULT_TARGETS}
# (measured in validate_estimators --kinds utterance; the paper reduced nothing: without the PCA, a
# 64-wide critic and 200 steps read 135 nats for independent 32-d Gaussians, in-sample)
ESTIMATORS["input"] = ("mine_utterance", dict(pca=8, steps=100, hidden=32, embed=16, lr=1e-3, max_utterances=10))
CSV_FIELDS = ("model", "checkpoint", "layer", "target", "method", "pca", "mi_nats", "std_nats", "repeats",
              "frames", "n_fit", "n_heldout", "ceiling_nats", "entropy_nats", "seconds")


def log(message: str) -> None:
    print(f"[layer_mi {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_checkpoint(spec: str) -> Tuple[Optional[str], str]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' -> (None, PATH): named after its model later."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name and not os.path.exists(spec) else (None, spec)


def frame_subset(utts: Sequence[Utterance], geometry: FrameGeometry, max_frames: Optional[int],
                 seed: int) -> List[np.ndarray]:
    """Per utterance, the sorted indices of its frames to use: all, or a seeded uniform subset of
    ``max_frames`` frames over the whole manifest."""
    counts = [geometry.n_frames(u.n_samples) for u in utts]
    if max_frames is None or sum(counts) <= max_frames:
        return [np.arange(n) for n in counts]
    chosen = np.sort(np.random.default_rng(seed).choice(sum(counts), max_frames, replace=False))
    starts = np.cumsum([0] + counts)
    return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def read_streams(args, utts: Sequence[Utterance], geometry: FrameGeometry,
                 keep: Sequence[np.ndarray]) -> Dict[str, Tensor]:
    """Targets other than layer0, at the model's frames, flattened in utterance order: "mfcc"
    (N, 39) float, "units" / "phones" (N,) long where given, and "groups" (N,) utterance index."""
    mfcc = read_mfcc(utts, geometry)
    streams = {"mfcc": mfcc}
    if args.kmeans:
        streams["units"] = kmeans_units(args.kmeans, mfcc)
    elif args.units:
        streams["units"] = read_labels(args.units, utts, geometry, UNIT_WIN)
    if args.phones:
        streams["phones"] = read_labels(args.phones, utts, geometry, PHONE_WIN)
    flat = {k: torch.from_numpy(np.concatenate([s[i] for s, i in zip(v, keep)])) for k, v in streams.items()}
    flat["mfcc"] = flat["mfcc"].float()
    flat["groups"] = torch.from_numpy(np.concatenate([np.full(len(i), u) for u, i in enumerate(keep)]))
    return flat


def timed_estimate(x: Tensor, y: Tensor, method: str, seed: int, repeats: int, groups: Tensor,
                   options: Dict) -> Tuple[MIEstimate, float]:
    """One :func:`estimate_mi` on one intra-op thread (the critics are tiny: more threads only
    add overhead), and its wall time in seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.time()
        return estimate_mi(x, y, method=method, seed=seed, repeats=repeats, groups=groups, **options), time.time() - start
    finally:
        torch.set_num_threads(threads)


def run_all(tasks: List[Tuple], pool: Optional[Executor]) -> Iterator[Tuple[MIEstimate, float]]:
    """timed_estimate(*task) for every task, yielded in task order (in ``pool``'s workers if given)."""
    if pool is None:
        yield from (timed_estimate(*task) for task in tasks)
    else:
        yield from (future.result() for future in [pool.submit(timed_estimate, *task) for task in tasks])


def analyse(name: str, path: str, model, normalize: bool, utts: Sequence[Utterance], streams: Dict[str, Tensor],
            keep: Sequence[np.ndarray], args, clock: "Progress", pool: Optional[Executor]) -> Tuple[Dict, List[Dict]]:
    """All layers x targets of one model -> (its JSON entry, its CSV rows)."""
    t0 = time.time()
    waves = [read_audio(u, normalize) for u in utts]
    layers = extract_layers(model, waves, keep, args.batch_seconds)
    n_head = head_layers(model)
    log(f"{name}: {len(layers) - 1 - n_head} encoder + {n_head} head layers, {layers[0].shape[0]} frames x "
        f"{layers[0].shape[1]} dims extracted in {time.time() - t0:.1f}s")
    clock.total += (len(layers) - 1 - estimated_layers(model)) * len(args.targets)  # feature_layer < L
    entry: Dict = {"checkpoint": os.path.abspath(path), "layers": len(layers) - 1,
                   "encoder_layers": len(layers) - 1 - n_head, "head_layers": n_head,
                   "frames": int(layers[0].shape[0]), "std": {}}
    targets = {t: streams[t] for t in args.targets if t in streams}
    entropy = {t: entropy_miller_madow(np.bincount(targets[t].numpy())) for t in ("units", "phones") if t in targets}
    if "input" in args.targets:
        targets = {**targets, "input": layers[0]}
    if "layer0" in args.targets:
        codes, entropy["layer0"] = layer0_codes(layers[0], args.layer0_codes, PCA, args.seed)
        log(f"{name}: layer-0 codebook, {args.layer0_codes} cells, H(c0) = {entropy['layer0']:.3f} nats")
        entry.update(layer0_codes=args.layer0_codes, layer0_entropy=round(entropy["layer0"], 4))
        targets = {"layer0": codes, **targets}
    points = [(k, target) for k in range(len(layers)) for target in targets]
    tasks = [(layers[k], targets[target], *ESTIMATORS[target][:1], args.seed, args.repeats, streams["groups"],
              ESTIMATORS[target][1]) for k, target in points]
    if "layer0" in targets:  # the null: layer 0 against its codes in a random order (independent, same histogram)
        tasks.append((layers[0], permuted(codes, args.seed), *tasks[0][2:]))
    results = run_all(tasks, pool)
    rows, parts = [], []
    for (k, target), (est, seconds) in zip(points, results):
        method, options = ESTIMATORS[target]
        entry.setdefault(target, []).append(round(est.value, 4))
        entry["std"].setdefault(target, []).append(round(est.std, 4))
        rows.append(dict(model=name, checkpoint=entry["checkpoint"], layer=k, target=target, method=method,
                         pca=options.get("pca"), mi_nats=f"{est.value:.4f}", std_nats=f"{est.std:.4f}",
                         repeats=args.repeats, frames=entry["frames"], n_fit=est.n_fit, n_heldout=est.n_heldout,
                         ceiling_nats="" if est.upper_bound is None else f"{est.upper_bound:.4f}",
                         entropy_nats=f"{entropy[target]:.4f}" if target in entropy else "", seconds=f"{seconds:.1f}"))
        parts.append(f"{target} {est.value:.3f}±{est.std:.3f}")
        clock.tick()
        if len(parts) == len(targets):
            log(f"{name} layer {k:2d}/{len(layers) - 1}: " + "  ".join(parts) + f"   [{clock}]")
            parts = []
    if "layer0" in targets:
        null, _ = next(results)
        entry["layer0_null"] = round(null.value, 4)
        clock.tick()
        log(f"{name}: layer 0 against permuted codes (the null, ~0): {null.value:.3f}±{null.std:.3f}   [{clock}]")
    return entry, rows


def estimated_layers(model) -> int:
    """Encoder plus head layers before extraction (a hubert_ctc_head model may feed its head from an earlier layer)."""
    return len(encoder_model(model).encoder.layers) + head_layers(model)


class Progress:
    """Counts finished estimates; str() gives elapsed time and the ETA from the mean rate."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def tick(self) -> None:
        self.done += 1

    def __str__(self) -> str:
        elapsed = time.time() - self.start
        eta = elapsed / max(1, self.done) * (self.total - self.done)
        return f"{self.done}/{self.total} estimates, {elapsed:.0f}s elapsed, ~{eta:.0f}s left"


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="python -m fairseq_mamba.analysis.layer_mi", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="[NAME=]CHECKPOINT",
                   help="fairseq checkpoints (mamba_hubert or hubert); NAME defaults to the model name")
    p.add_argument("--manifest", required=True, help="fairseq manifest (.tsv: root line, then path<TAB>samples)")
    p.add_argument("--out", required=True, help="output directory for layer_mi.{csv,json,png}")
    units = p.add_mutually_exclusive_group()
    units.add_argument("--kmeans", help="MFCC k-means model (run_scripts/03_kmeans.sh on MFCC): units = its "
                                        "cluster of each frame's MFCC")
    units.add_argument("--units", help="unit labels, one line per manifest row (e.g. run_scripts/04 {split}.km)")
    p.add_argument("--phones", help="phone labels at 100 Hz, one line per manifest row (examples/corpus/data/*.phn)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(DEFAULT_TARGETS),
                   help="what each layer is paired with (default: %(default)s; units/phones only when given). "
                        "input: layer 0 itself by the seed paper's procedure (MINE-DV per utterance, "
                        "fairseq_mamba.analysis.utterance_mine)")
    p.add_argument("--layer0-codes", type=int, default=N_CODES, help="cells of each model's layer-0 k-means "
                                                                     f"codebook, the layer0 target (default {N_CODES})")
    p.add_argument("--repeats", type=int, default=2, help="estimates per point (new split and critic each); "
                                                          "their std is the spread (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-frames", type=int, default=20000, help="uniform frame subset over the manifest")
    p.add_argument("--batch-seconds", type=float, default=16.0, help="padded audio per forward (0: one utterance)")
    p.add_argument("--jobs", type=int, default=1, help="estimator processes (one thread each; default 1)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    utts = read_manifest(args.manifest)
    specs = [parse_checkpoint(c) for c in args.checkpoints]
    for _, path in specs:  # fail before any work
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path} does not exist")
    result: Dict = {"manifest": os.path.abspath(args.manifest), "utterances": len(utts), "seed": args.seed,
                    "repeats": args.repeats, "models": {}, "targets": {},
                    "estimators": {t: {"method": m, "options": o} for t, (m, o) in ESTIMATORS.items()
                                   if t in args.targets}}
    models = []
    for name, path in specs:  # all loaded first: names and sizes are checked before any work
        model, model_name, normalize = load_checkpoint(path)
        name = name or model_name
        if name in [m[0] for m in models]:
            raise ValueError(f"two checkpoints are named {name!r}; name them: NAME=PATH")
        models.append((name, path, model, model_name, normalize))
    args.targets = [t for t in args.targets if t not in ("units", "phones")
                    or (args.kmeans or args.units if t == "units" else args.phones)]
    n_null = int("layer0" in args.targets)
    clock = Progress(sum((estimated_layers(m[2]) + 1) * len(args.targets) + n_null for m in models))
    rows: List[Dict] = []
    cache: Dict[Tuple, Tuple] = {}
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) if args.jobs > 1 else None
    try:
        while models:
            name, path, model, model_name, normalize = models.pop(0)
            geometry = FrameGeometry.of(model)
            if geometry.convs not in cache:  # streams depend only on the conv stack's frame geometry
                keep = frame_subset(utts, geometry, args.max_frames, args.seed)
                cache[geometry.convs] = (keep, read_streams(args, utts, geometry, keep))
                describe_targets(result, cache[geometry.convs][1], args)
            keep, streams = cache[geometry.convs]
            log(f"{name} ({model_name}): {len(utts)} utterances, {len(streams['groups'])} frames, "
                f"{(estimated_layers(model) + 1) * len(args.targets) + n_null} estimates x {args.repeats} repeats")
            entry, model_rows = analyse(name, path, model, normalize, utts, streams, keep, args, clock, pool)
            entry["model"] = model_name
            result["models"][name], rows = entry, rows + model_rows
            del model
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for target, spec in result["estimators"].items():  # InfoNCE's ceiling log N_heldout, for the plot
        spec["ceiling"] = next((float(r["ceiling_nats"]) for r in rows if r["target"] == target
                                and r["ceiling_nats"] and spec["method"] == "infonce"), None)
    result["frames"] = max(m["frames"] for m in result["models"].values())
    result["wall_seconds"] = round(time.time() - start, 1)
    write_outputs(args.out, result, rows)
    log(f"done in {result['wall_seconds']}s: {args.out}/layer_mi.csv, layer_mi.json, layer_mi.png")
    return result


def describe_targets(result: Dict, streams: Dict[str, Tensor], args) -> None:
    """result["targets"]: source and size of each target; label entropy H(y) (plug-in,
    Miller-Madow, all frames), the ceiling of any estimate of I(layer; labels)."""
    n_utts = len(torch.unique(streams["groups"]))
    described = {"layer0": {"source": "each model's layer-0 k-means code (fairseq_mamba.analysis."
                                      "reconstruction; its entropy: models[NAME].layer0_entropy)",
                            "classes": args.layer0_codes, "pca": PCA},
                 "mfcc": {"source": "fairseq MfccFeatureReader (39-d)", "dim": int(streams["mfcc"].shape[1])},
                 "input": {"source": "each model's layer 0 itself, the seed paper's MINE-DV per utterance "
                                     "(fairseq_mamba.analysis.utterance_mine)",
                           "mean_frames_per_utterance": round(len(streams["groups"]) / n_utts, 1)}}
    result["targets"].update({t: v for t, v in described.items() if t in args.targets})
    for target, source in (("units", args.kmeans or args.units), ("phones", args.phones)):
        if target in streams and target in args.targets:
            counts = np.bincount(streams[target].numpy())
            result["targets"][target] = {"source": os.path.abspath(source), "classes": int((counts > 0).sum()),
                                         "entropy_nats": round(entropy_miller_madow(counts), 4)}


def write_outputs(out: str, result: Dict, rows: List[Dict]) -> None:
    with open(os.path.join(out, "layer_mi.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "layer_mi.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_layer_mi(result, os.path.join(out, "layer_mi.png"))


def cli(argv: Optional[Sequence[str]] = None) -> Dict:
    """main(), with bad input (ValueError) reported as one line and exit status 1."""
    try:
        return main(argv)
    except ValueError as err:
        sys.exit(f"layer_mi: error: {err}")


if __name__ == "__main__":
    cli()
