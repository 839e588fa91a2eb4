"""Validate the estimators of :mod:`.layer_mi` on known MI at the analysis's sample size.

    python -m fairseq_mamba.analysis.validate_estimators [--frames 9085] [--json OUT.json]

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
* independence: the same shapes with MI = 0, which shows each method's bias at zero.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .ground_truth import gaussian_mixture, gaussian_pair, mixed_gaussian_pair
from .layer_mi import ESTIMATORS
from .mutual_information import estimate_mi


def cases(n: int) -> List[Tuple[str, str, Tensor, Tensor, float]]:
    """(kind, description, x, y, true MI) for every validation case."""
    out = [("continuous", f"gaussian d={d} I={mi}", *gaussian_pair(mi, d, n), mi)
           for d in (8, 16, 32) for mi in (0.5, 2.0, 5.0)]
    out += [("continuous", f"d=128 mixed from 16-d latent I={mi}", *mixed_gaussian_pair(mi, n)) for mi in (0.5, 2.0, 5.0)]
    for k, scale in ((50, 0.15), (50, 0.35), (50, 0.6), (72, 0.45)):
        x, y, true, _ = gaussian_mixture(k, 32, scale, n)
        out.append(("discrete", f"mixture K={k} d=32 scale={scale}", x, y, true))
    g = torch.Generator().manual_seed(5)
    out.append(("continuous", "independent d=32", torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g), 0.0))
    out.append(("discrete", "independent d=32, K=50", torch.randn(n, 32, generator=g), torch.randint(50, (n,), generator=g),
                0.0))
    return out


def alternatives(kind: str) -> Dict[str, Tuple[str, Dict]]:
    """label -> (method, options): the chosen estimator first, then the rejected alternatives."""
    target = "mfcc" if kind == "continuous" else "units"
    method, options = ESTIMATORS[target]
    out = {f"chosen ({method}, pca {options.get('pca')})": (method, options), "mine": ("mine", options)}
    if kind == "continuous":
        out["ksg (pca 8)"] = ("ksg", dict(pca=8))
    else:
        out["plugin 64 codes"] = ("plugin", dict(pca=options.get("pca"), n_codes=64))
        out["plugin 256 codes"] = ("plugin", dict(pca=options.get("pca"), n_codes=256))
    return out


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="python -m fairseq_mamba.analysis.validate_estimators", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=9085)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    print(f"{'case':38s} {'true':>6s}  {'estimator':28s} {'estimate':>8s} {'error':>8s} {'sec':>5s}")
    for kind, name, x, y, true in cases(args.frames):
        for label, (method, options) in alternatives(kind).items():
            t = time.time()
            est = estimate_mi(x, y, method=method, **options)
            err = (est.value - true) / true if true else est.value - true
            rows.append(dict(kind=kind, case=name, true=round(true, 4), estimator=label, method=method,
                             estimate=round(est.value, 4), error=round(err, 4), relative=bool(true),
                             seconds=round(time.time() - t, 1)))
            shown = f"{err:+8.1%}" if true else f"{err:+8.3f}"
            print(f"{name:38s} {true:6.3f}  {label:28s} {est.value:8.3f} {shown} {time.time() - t:5.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": args.frames, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
