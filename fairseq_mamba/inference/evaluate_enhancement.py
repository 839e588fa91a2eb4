"""Score a ``hubert_enhancer`` checkpoint on one split: log-spectral distance to the clean speech.

    python -m fairseq_mamba.inference.evaluate_enhancement CHECKPOINT MANIFEST_DIR [--split test] [--out test.json]

Every utterance of ``MANIFEST_DIR/{split}.tsv`` is mixed with its fixed noise (the task's
``noise_seed``, SNRs and noise types saved in the checkpoint) and enhanced whole, one utterance
per forward (no padding). Per utterance, the mean over its frames of the log-spectral distance
(dB, :func:`~fairseq_mamba.criterions.spectral_reconstruction.log_spectral_distance`) between
the clean log-power frames and (a) the noisy input's, (b) the model's prediction; printed (and
written to ``--out``) as JSON, averaged over utterances: ``lsd_noisy_db``,
``lsd_enhanced_db``, ``lsd_improvement_db`` = (a) - (b) (> 0: the model enhances), and the same
per SNR under ``by_snr``; ``lsd_mean_spectrum_db`` is a trivial enhancer's score, one that ignores
its input and outputs the split's mean clean frame everywhere (an oracle constant): a model must
beat it to have learnt anything about the frame in front of it.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def load(checkpoint: str, data: str):
    """(model in eval mode, task) of a hubert_enhancer checkpoint, its task reading ``data``."""
    import fairseq_mamba  # noqa: F401  (registers the task, model and criterion)
    from fairseq import checkpoint_utils

    if not os.path.isfile(checkpoint):
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    if cfg.model._name != "hubert_enhancer":
        raise ValueError(f"checkpoint {checkpoint} holds a {cfg.model._name} model, not hubert_enhancer "
                         "(train one with run_scripts/10_reconstruction.sh)")
    return models[0].eval(), task


def summary(rows: List[Dict]) -> Dict:
    noisy, enhanced = (float(np.mean([r[k] for r in rows])) for k in ("noisy", "enhanced"))
    return {"utterances": len(rows), "lsd_noisy_db": round(noisy, 3), "lsd_enhanced_db": round(enhanced, 3),
            "lsd_improvement_db": round(noisy - enhanced, 3)}


@torch.no_grad()
def evaluate(model, dataset) -> Dict:
    from fairseq_mamba.criterions.spectral_reconstruction import log_spectral_distance

    rows, cleans = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        out = model(item["source"][None])
        pred = out["pred"][0][~out["padding_mask"][0]]
        clean = model.target_frames(item["clean"][None], len(pred))[0]
        noisy = model.target_frames(item["source"][None], len(pred))[0]
        cleans.append(clean)
        rows.append(dict(snr=item["snr"], noise=item["noise"], frames=len(pred),
                         noisy=float(log_spectral_distance(noisy, clean).mean()),
                         enhanced=float(log_spectral_distance(pred, clean).mean())))
    by_snr = defaultdict(list)
    for r in rows:
        by_snr[r["snr"]].append(r)
    mean = torch.cat(cleans).mean(0)
    trivial = np.mean([float(log_spectral_distance(mean.expand_as(c), c).mean()) for c in cleans])
    return {**summary(rows), "lsd_mean_spectrum_db": round(float(trivial), 3),
            "frames": sum(r["frames"] for r in rows),
            "by_snr": {f"{snr:g}": summary(rs) for snr, rs in sorted(by_snr.items())},
            "noise_types": sorted({r["noise"] for r in rows})}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m fairseq_mamba.inference.evaluate_enhancement", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data", help="directory with fairseq manifests {split}.tsv")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    start = time.time()
    model, task = load(args.checkpoint, os.path.abspath(args.data))
    task.load_dataset(args.split)
    result = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split,
              "encoder": str(model.encoder_model.__class__.__name__), "snrs": list(task.cfg.snrs),
              **evaluate(model, task.dataset(args.split))}
    result["seconds"] = round(time.time() - start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"evaluate_enhancement: error: {err}")
