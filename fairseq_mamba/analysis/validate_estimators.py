"""Validate the estimators of :mod:`.layer_mi` on known MI at the analysis's sample size.

    python -m fairseq_mamba.analysis.validate_estimators [--frames 9085] [--kinds coded ...] [--json OUT.json]

``--frames`` defaults to the valid frames of the bundled test split at 50 Hz (61 utterances).
Every case is estimated with the settings ``layer_mi.ESTIMATORS`` uses for that kind of target
("chosen") and with the alternatives, and printed as: case, true MI, estimate, relative error,
seconds. Cases:

* continuous (the layer0 and mfcc targets): correlated Gaussians, 0.5 / 2 / 5 nats in d = 8, 16
  and 32 (the dimension after PCA; MI spread evenly over all of them, the hardest case), and
  d = 128 pairs mixed from a 16-d latent pair plus noise (variance in a few directions, as in
  real features: what the PCA reduction relies on);
* discrete (the units and phones targets): Gaussian mixtures with 50 and 72 overlapping
  classes in 32 dimensions (Monte-Carlo truth), the size of the demo's unit and phone sets;
* coded (the layer0 target, :mod:`.reconstruction`): a 32-d "layer 0" and its 64-valued code
  (the signs of 6 coordinates: H = 6 log 2 = 4.16 nats), against a "layer k" that is layer 0
  itself, an invertible nonlinear map of it, the same after discarding 4 of the 6 coded
  coordinates, or after adding noise (exact truth, ``ground_truth.quantised_channel``); and
  layer 0's own 64-cell k-means code (the analysis's codebook, truth H(c0)) against layer 0 and
  an invertible map of it. "plugin" there is I(code of layer k; c0), the k-means plug-in;
* utterance (the seed paper's procedure, ``layer_mi --targets input``): correlated Gaussians
  (0.5 / 2 / 5 nats, d = 8 and 32) cut into "utterances" of ``UTTERANCE_FRAMES`` frames, the
  deterministic case y = x (infinite MI: where each estimator saturates) and independence;
  estimated per utterance in-sample (the paper's way), per utterance held-out, and by the
  default pooled InfoNCE over all frames;
* independence: the same shapes with MI = 0, which shows each method's bias at zero.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .ground_truth import gaussian_mixture, gaussian_pair, mixed_gaussian_pair, quantised_channel
from .layer_mi import ESTIMATORS
from .mutual_information import estimate_mi
from .reconstruction import layer0_codes

UTTERANCE_FRAMES = 150  # ~ the bundled test split's mean frames per utterance at 50 Hz (9085 / 61)


def cases(n: int) -> List[Tuple[str, str, Tensor, Tensor, float]]:
    """(kind, description, x, y, true MI) for every validation case."""
    out = [("continuous", f"gaussian d={d} I={mi}", *gaussian_pair(mi, d, n), mi)
           for d in (8, 16, 32) for mi in (0.5, 2.0, 5.0)]
    out += [("continuous", f"d=128 mixed from 16-d latent I={mi}", *mixed_gaussian_pair(mi, n)) for mi in (0.5, 2.0, 5.0)]
    for k, scale in ((50, 0.15), (50, 0.35), (50, 0.6), (72, 0.45)):
        x, y, true, _ = gaussian_mixture(k, 32, scale, n)
        out.append(("discrete", f"mixture K={k} d=32 scale={scale}", x, y, true))
    for name, kw in (("invertible map", {}), ("4 of 6 coded coordinates lost", dict(lost=4)),
                     ("noise 0.3", dict(noise=0.3)), ("noise 1", dict(noise=1.0))):
        h0, layer, code, true = quantised_channel(n, **kw)
        out.append(("coded", f"sign code, {name}", layer, code, true))
    h0, layer, code, true = quantised_channel(n)
    out.append(("coded", "sign code, layer 0 itself", h0, code, true))
    codes, entropy = layer0_codes(h0)
    out += [("coded", "k-means code, layer 0 itself", h0, codes, entropy),
            ("coded", "k-means code, invertible map", layer, codes, entropy)]
    g = torch.Generator().manual_seed(5)
    out.append(("continuous", "independent d=32", torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g), 0.0))
    out.append(("discrete", "independent d=32, K=50", torch.randn(n, 32, generator=g), torch.randint(50, (n,), generator=g),
                0.0))
    out.append(("coded", "independent d=32, 64 codes", torch.randn(n, 32, generator=g),
                torch.randint(64, (n,), generator=g), 0.0))
    out += [("utterance", f"gaussian d={d} I={mi}, utterances", *gaussian_pair(mi, d, n), mi)
            for d in (8, 32) for mi in (0.5, 2.0, 5.0)]
    x = torch.randn(n, 32, generator=g)
    out.append(("utterance", "y = x d=32 (infinite MI), utterances", x, x.clone(), float("inf")))
    out.append(("utterance", "independent d=32, utterances", torch.randn(n, 32, generator=g),
                torch.randn(n, 32, generator=g), 0.0))
    return out


def alternatives(kind: str) -> Dict[str, Tuple[str, Dict]]:
    """label -> (method, options): the chosen estimator first, then the rejected alternatives."""
    if kind == "utterance":
        method, options = ESTIMATORS["input"]
        return {"paper (mine_utterance, in-sample)": (method, options),
                "mine_utterance held-out 0.3": (method, dict(options, held_out=0.3)),
                "default (infonce, pca 32, pooled)": ESTIMATORS["mfcc"]}
    target = {"continuous": "mfcc", "discrete": "units", "coded": "layer0"}[kind]
    method, options = ESTIMATORS[target]
    out = {f"chosen ({method}, pca {options.get('pca')})": (method, options), "mine": ("mine", options)}
    if kind == "continuous":
        out["ksg (pca 8)"] = ("ksg", dict(pca=8))
    else:
        out["plugin 64 codes"] = ("plugin", dict(pca=options.get("pca"), n_codes=64))
        if kind == "discrete":
            out["plugin 256 codes"] = ("plugin", dict(pca=options.get("pca"), n_codes=256))
    return out


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="python -m fairseq_mamba.analysis.validate_estimators", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=9085)
    p.add_argument("--kinds", nargs="+", choices=("continuous", "discrete", "coded", "utterance"),
                   default=("continuous", "discrete", "coded", "utterance"),
                   help="which kinds of cases to run (default: all)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    print(f"{'case':38s} {'true':>6s}  {'estimator':28s} {'estimate':>8s} {'error':>8s} {'sec':>5s}")
    for kind, name, x, y, true in cases(args.frames):
        if kind not in args.kinds:
            continue
        for label, (method, options) in alternatives(kind).items():
            t = time.time()
            groups = torch.arange(len(x)) // UTTERANCE_FRAMES  # utterances, for the utterance kind
            est = estimate_mi(x, y, method=method, **options, **({"groups": groups} if kind == "utterance" else {}))
            err = (est.value - true) / true if 0 < true < float("inf") else est.value - true if true == 0 else float("nan")
            rows.append(dict(kind=kind, case=name, true=round(true, 4), estimator=label, method=method,
                             estimate=round(est.value, 4), error=round(err, 4), relative=0 < true < float("inf"),
                             seconds=round(time.time() - t, 1)))
            shown = f"{err:+8.1%}" if 0 < true < float("inf") else f"{err:+8.3f}"  # nan: infinite truth
            print(f"{name:38s} {true:6.3f}  {label:28s} {est.value:8.3f} {shown} {time.time() - t:5.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": args.frames, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
