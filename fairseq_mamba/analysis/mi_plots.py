"""The layer-wise MI figure of :mod:`.layer_mi`: one panel per target, every model on the same axes."""
from __future__ import annotations

from typing import Dict

TITLES = {
    "layer0": "I(layer k; layer-0 code c0)  [reconstruction view]",
    "mfcc": "I(layer k; MFCC input)",
    "units": "I(layer k; k-means units)",
    "phones": "I(layer k; phone labels)",
    "input": "I(layer k; layer 0), MINE-DV per utterance  [the paper's procedure]",
}


def plot_layer_mi(result: Dict, path: str) -> None:
    """Write ``path`` (PNG) from the :mod:`.layer_mi` JSON ``result``.

    Panels: the targets present; x: layer index (0 = encoder input); y: MI in nats, mean over
    repeats with their std as error bars; dotted line: the estimator's ceiling (InfoNCE's
    log N_heldout); dashed: the labels' entropy H(y), the most any layer can share with them
    (also in the title); for layer0, each model's H(c0) in its colour (its own codebook; the
    k = 0 point estimates exactly that). The ceiling and H(y) lines are drawn only when a curve
    comes within half of them, so that they do not flatten the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in TITLES if any(t in m for m in result["models"].values())]
    cols = min(2, len(targets))
    rows = (len(targets) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, target in zip(axes.flat, targets):
        for name, model in result["models"].items():
            if target in model:
                values = model[target]
                line = ax.errorbar(range(len(values)), values, yerr=model["std"][target], marker="o", ms=3,
                                   capsize=2, label=name)
                if target == "layer0":
                    ax.axhline(model["layer0_entropy"], color=line[0].get_color(), ls="--", lw=1,
                               label=f"{name}: H(c0) = {model['layer0_entropy']:.2f}, {model['layer0_codes']} codes")
        spec = result["estimators"][target]
        top = max(max(m[target]) for m in result["models"].values() if target in m)
        if spec.get("ceiling") is not None and top > 0.5 * spec["ceiling"]:  # else it only squashes the curves
            ax.axhline(spec["ceiling"], color="grey", ls=":", lw=1, label=f"ceiling log N = {spec['ceiling']:.2f}")
        entropy = result["targets"].get(target, {}).get("entropy_nats")
        if entropy is not None and top > 0.5 * entropy:
            ax.axhline(entropy, color="black", ls="--", lw=1, label=f"H(labels) = {entropy:.2f}")
        ax.set_title(TITLES[target] + ("" if entropy is None else f",  H(labels) = {entropy:.2f}"), fontsize=10)
        ax.set_xlabel(f"layer (0 = encoder input)   [{spec['method']}, PCA {spec['options'].get('pca')}]",
                      fontsize=8)
        ax.set_ylabel("MI (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    fig.suptitle(f"Layer-wise mutual information, {result['frames']} frames of {result['manifest']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
