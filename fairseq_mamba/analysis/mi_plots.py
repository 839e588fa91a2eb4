"""The layer-wise MI figures: :func:`plot_layer_mi` (stage 09, one panel per target, every checkpoint on
the same axes) and :func:`plot_checkpoint_curves` (the demo's report, model by model, where a curve
rises again marked by :func:`rise_again`)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

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


def rise_again(values: Sequence[float], spread: Optional[Sequence[float]] = None) -> Tuple[int, float, float, bool]:
    """Does a layer-wise MI curve fall and then rise again toward its last layer?

    values: MI per layer (0 = the encoder's input); spread: each layer's std over repeats.
    Returns (k, rise, noise, real): k the layer of the curve's minimum, rise = values[-1] - values[k]
    (0 when the minimum is the last layer: no rise), noise = the larger spread of the two layers,
    real = the rise exceeds twice that noise (with 2 repeats a std is itself rough, hence the margin)."""
    if not len(values):
        raise ValueError("rise_again: an empty curve (no layers)")
    k = min(range(len(values)), key=values.__getitem__)
    rise = float(values[-1] - values[k])
    noise = float(max(spread[k], spread[-1])) if spread else 0.0
    return k, rise, noise, k < len(values) - 1 and rise > 2 * noise


def plot_checkpoint_curves(curves: Dict[str, List[Tuple[str, Dict]]], targets: Sequence[str], path: str) -> List[str]:
    """Write ``path`` (PNG): one row per model, one column per target, that model's checkpoints
    (pre-trained, scratch, fine-tuned alone, + head, reconstruction) as curves on y axes shared down
    each column. curves: {model: [(label, mi)]}, mi = a stage-09 entry ({target: [MI per layer],
    "std": {target: [...]}, "encoder_layers": n}). A dotted vertical line separates the encoder's
    layers from a head's; where a curve rises again after its minimum, a bracket from the minimum
    to the last layer is labelled with the rise and its noise (solid and starred: above twice the
    noise; dashed: within it). Returns those labels, "model | checkpoint | target: text"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in targets if any(t in mi for rows in curves.values() for _, mi in rows)]
    if not curves or not targets:
        raise ValueError(f"plot_checkpoint_curves: nothing to plot (models {list(curves)}, targets {list(targets)})")
    fig, axes = plt.subplots(len(curves), len(targets), figsize=(5.2 * len(targets), 3.4 * len(curves)),
                             squeeze=False, sharey="col")
    marks = []
    for row, (model, rows) in zip(axes, curves.items()):
        for ax, target in zip(row, targets):
            for label, mi in rows:
                if target not in mi:
                    continue
                values, spread = mi[target], mi.get("std", {}).get(target)
                line = ax.errorbar(range(len(values)), values, yerr=spread, marker="o", ms=3, capsize=2, label=label)
                n_enc = mi.get("encoder_layers")
                if n_enc is not None and n_enc + 1 < len(values):
                    ax.axvline(n_enc + 0.5, color=line[0].get_color(), ls=":", lw=1)
                k, rise, noise, real = rise_again(values, spread)
                if rise > 0:
                    last = len(values) - 1
                    ax.plot([last + 0.15] * 2, [values[k], values[-1]], color=line[0].get_color(),
                            ls="-" if real else "--", lw=1.5)
                    text = f"+{rise:.2f} ({'>' if real else '<='} 2x{noise:.2f}){' *' if real else ''}"
                    ax.annotate(text, (last + 0.2, (values[k] + values[-1]) / 2), fontsize=6, color=line[0].get_color())
                    marks.append(f"{model} | {label} | {target}: {text}")
            ax.set_title(f"{model}: {TITLES.get(target, target)}", fontsize=8)
            ax.set_xlabel("layer (0 = encoder input; head layers after the dotted line)", fontsize=7)
            ax.set_ylabel("MI (nats)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("MI per layer of every checkpoint\nbracket: rise after the minimum (*: above twice its spread)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return marks
