"""The paper's ASR experiment in a demo run: per model, fine-tuned alone, with the extra module, and
from scratch (demo.sh's WORK/finetune/{m, m_HEAD, m_scratch} and WORK/decode/...), and the
reconstruction model (WORK/reconstruction/m) when it ran. Used by make_report.py.

results.json gains per model ``"finetune": {"alone": E, HEAD: E}``, ``"scratch": E`` and
``"reconstruction": {...}``, E = {wer_test, cer_test, wer_test_lm, cer_test_lm, params, checkpoint
(, mi)}; "mi" is stage 09's curves of that checkpoint (WORK/mi/m/layer_mi.json, model name
``m_alone``, ``m_HEAD``, ``m_scratch``, ``m_recon``) when it ran.
"""
import json
import os
import re

from fairseq_mamba.analysis.mi_plots import plot_checkpoint_curves, rise_again

VARIANTS = ("scratch", "alone", "head")
MI_TARGETS = ("layer0", "mfcc", "units", "phones", "input")
MI_EXTRA = ("std", "encoder_layers", "head_layers")
# The papers' LibriSpeech numbers, from a summary of them (not our measurements): test-clean WER %.
PAPER = {
    ("mamba_hubert", "alone"): "12.32 (layer-9 features, 100 h)",
    ("mamba_hubert", "head"): "9.2 (+ Conformer, 100 h)",
    ("hubert", "head"): "9.3 (+ the same Conformer, 100 h)",
    ("mamba_hubert", "scratch"): "37.7 (ExtBiMamba from scratch, arXiv 2405.12609)",
    ("hubert", "scratch"): "8.4 (Transformer from scratch, arXiv 2405.12609)",
}


def read_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {}


def mi_curves(layer_mi, name):
    """Stage 09's curves of one checkpoint (WORK/mi/MODEL/layer_mi.json's entry NAME): one value per layer
    and target, their spreads ("std") and, where given, how many layers are encoder and head."""
    mi = layer_mi.get("models", {}).get(name)
    if not mi:
        return None
    return {k: mi[k] for k in MI_TARGETS + MI_EXTRA if k in mi}


def run_name(m, variant, head):
    """WORK/finetune and WORK/decode sub-directory of a variant, as demo.sh names them."""
    return m if variant == "alone" else f"{m}_{head if variant == 'head' else variant}"


def logged_params(log_path):
    """The parameter count fairseq logs when it builds the model ("num. shared model params: N")."""
    try:
        for line in open(log_path, errors="replace"):
            m = re.search(r"num\. shared model params: ([\d,]+)", line)
            if m:
                return int(m.group(1).replace(",", ""))
    except OSError:
        pass
    return None


def variant_entry(work, m, variant, head, layer_mi):
    name = run_name(m, variant, head)
    dec = read_json(os.path.join(work, "decode", name, "test.json"))
    if not dec:
        return None
    lm = dec.get("lm", {})
    entry = {"wer_test": dec.get("wer"), "cer_test": dec.get("cer"), "wer_test_lm": lm.get("wer"),
             "cer_test_lm": lm.get("cer"),
             "params": logged_params(os.path.join(work, "finetune", name, "train.log")),
             "checkpoint": os.path.join("finetune", name, "checkpoints", "checkpoint_best.pt")}
    mi = mi_curves(layer_mi, f"{m}_alone" if variant == "alone" else name)
    if mi:
        entry["mi"] = mi
    return entry


def experiment(work, m, head, layer_mi):
    """{"finetune": {"alone": E, head: E}, "scratch": E, "reconstruction": R} of model m (missing parts
    left out)."""
    out = {"finetune": {}}
    for variant in VARIANTS:
        e = variant_entry(work, m, variant, head, layer_mi)
        if e is None:
            continue
        if variant == "scratch":
            out["scratch"] = e
        else:
            out["finetune"]["alone" if variant == "alone" else head] = e
    rec = read_json(os.path.join(work, "reconstruction", m, "test.json"))
    if rec:
        mi = mi_curves(layer_mi, f"{m}_recon")
        if mi:
            rec["mi"] = mi
        out["reconstruction"] = rec
    return out


def fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def row_sentence(m, variant, head, e, ref):
    """One sentence on what a row shows, from the numbers (ref = the same model fine-tuned alone)."""
    best = min(v for v in (e["wer_test"], e["wer_test_lm"]) if v is not None)
    if variant == "alone":
        return f"The pre-trained encoder with a linear CTC layer: the baseline of this model's rows (best WER {best:.2f})."
    ref_best = min(v for v in (ref["wer_test"], ref["wer_test_lm"]) if v is not None) if ref else None
    if ref_best is None:
        return f"Best WER {best:.2f}."
    diff = best - ref_best
    if variant == "scratch":
        return (f"No pre-training, same schedule: {abs(diff):.2f} points {'above' if diff > 0 else 'below'} the "
                f"fine-tuned encoder alone, {'what pre-training buys' if diff > 0 else 'pre-training did not help'} here.")
    verdict = "helps" if diff < 0 else "does not help"
    return f"One {head} layer on top {verdict}: {abs(diff):.2f} points {'below' if diff < 0 else 'above'} fine-tuning alone."


def markdown(results, models, head, settings):
    """The report's table (model x {scratch, alone, + head}, Viterbi and LM) with the papers' numbers."""
    lines = ["## The paper's ASR experiment: from scratch, fine-tuned alone, and with an extra module", "",
             f"Every row: the same data, fine-tuning schedule ({settings.get('FT_UPDATES', '?')} updates), seed "
             "and decoding (stage 08) on the test split. *+ head*: one layer of "
             f"`{head}` (fairseq's layer; `hubert_ctc_head`) between the encoder and the CTC layer; *scratch*: the same "
             "architecture from random initialisation (`model.no_pretrained_weights=true`). The papers' column is "
             "theirs (LibriSpeech test-clean, Base models, from a summary of the papers), not measured here.", "",
             "| model | variant | params | WER % | CER % | WER % with LM | CER % with LM | paper's WER % | what the row shows |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        exp = results["models"][m]
        ref = exp["finetune"].get("alone")
        for variant in VARIANTS:
            e = exp.get("scratch") if variant == "scratch" else exp["finetune"].get("alone" if variant == "alone" else head)
            if not e:
                continue
            label = {"scratch": "scratch", "alone": "fine-tuned alone", "head": f"+ {head} head"}[variant]
            params = "n/a" if e["params"] is None else f"{e['params']:,}"
            paper = PAPER.get((m, variant), "") if variant != "head" or head == "conformer" else ""
            lines.append(f"| {m} | {label} | {params} | {fmt(e['wer_test'])} | {fmt(e['cer_test'])} | "
                         f"{fmt(e['wer_test_lm'])} | {fmt(e['cer_test_lm'])} | {paper} | "
                         f"{row_sentence(m, variant, head, e, ref)} |")
    recs = {m: results["models"][m].get("reconstruction") for m in models}
    keys = ("lsd_noisy_db", "lsd_enhanced_db", "lsd_improvement_db", "lsd_mean_spectrum_db")
    if any(recs.values()):
        lines += ["", "Reconstruction models (the same encoder trained for speech enhancement, stage 10; test split, "
                  "log-spectral distance in dB from the clean speech: noisy input, enhanced, improvement, and a trivial "
                  "enhancer that outputs the mean clean frame):", "", "| model | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {m} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for m, r in recs.items() if r]
    return lines


def curve_checkpoints(results, m):
    """[(label, mi)] of model m's checkpoints that stage 09 measured, in the report's order."""
    r = results["models"][m]
    items = [("pre-trained", r.get("mi")), ("scratch", (r.get("scratch") or {}).get("mi"))]
    items += [(f"fine-tuned {v}" if v == "alone" else f"+ {v} head", e.get("mi")) for v, e in r.get("finetune", {}).items()]
    items.append(("reconstruction", (r.get("reconstruction") or {}).get("mi")))
    return [(label, mi) for label, mi in items if mi]


def mi_markdown(work, results, models):
    """The report's MI section: every checkpoint's curves, and where a curve rises again."""
    curves = {m: c for m in models if (c := curve_checkpoints(results, m))}
    rows = [(m, label, mi) for m, c in curves.items() for label, mi in c]
    if not rows:
        return []
    lines = ["## Mutual information per layer (stage 09, test split)", "",
             "Nats per layer (0 = the encoder's input; a head's layers follow the encoder's, after the ‖): "
             "`mi/<model>/layer_mi.csv`; estimators and how to read the curves: README, \"Mutual-information analysis\". "
             "*Rises again*: the curve's last layer exceeds its minimum by more than twice the larger spread of the "
             "two (spread = the 2 repeats' std).", ""]
    plot_checkpoint_curves(curves, MI_TARGETS, os.path.join(work, "mi", "checkpoint_mi.png"))
    lines += ["![MI per layer, model by model](mi/checkpoint_mi.png)", ""]
    lines += ["| model | checkpoint | target | per layer | rises again? |", "|---|---|---|---|---|"]
    for m, label, mi in rows:
        n_enc = mi.get("encoder_layers")
        for t in MI_TARGETS:
            if t not in mi:
                continue
            vals = mi[t]
            text = " ".join(f"{v:.2f}" for v in vals)
            if n_enc is not None and n_enc + 1 < len(vals):
                text = " ".join(f"{v:.2f}" for v in vals[: n_enc + 1]) + " ‖ " + " ".join(f"{v:.2f}" for v in vals[n_enc + 1:])
            k, rise, noise, real = rise_again(vals, mi.get("std", {}).get(t))
            verdict = (f"yes: +{rise:.2f} after layer {k} (spread {noise:.2f})" if real
                       else "no" if k == len(vals) - 1 else f"within noise: +{rise:.2f} after layer {k} (spread {noise:.2f})")
            lines.append(f"| {m} | {label} | {t} | {text} | {verdict} |")
    return lines + [""]
