"""make_report.py WORK MODEL...: report.md, PNG plots and results.json from a demo run's own logs.

Reads, per model, WORK/pretrain/<m>_iter{1,2}/train.log (fairseq 'simple' log lines),
peak_rss_mb.txt files, WORK/finetune/<m>/train.log and WORK/decode/<m>/test.json.
"""
import json
import os
import re
import sys

KV = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[= ]([-+]?[0-9][0-9.e+-]*)(?=,|\s*\||\s*$)")


def parse_log(path):
    """(inner, epochs, params): train_inner and train-epoch dicts, and the parameter count."""
    inner, epochs, params = [], [], None
    if not os.path.exists(path):
        return inner, epochs, params
    for line in open(path, errors="replace"):
        m = re.search(r"num\. shared model params: ([\d,]+)", line)
        if m and params is None:
            params = int(m.group(1).replace(",", ""))
        if "][train_inner][" in line:
            body = line.split(" - ", 1)[1]
            body = body.split(":", 1)[1] if ":" in body.split("loss", 1)[0] else body
            d = {k: float(v) for k, v in KV.findall(body)}
            if "num_updates" in d:
                inner.append(d)
        elif "][train][" in line and " - epoch " in line:
            d = {k: float(v) for k, v in KV.findall(line.split(" - ", 1)[1].replace("epoch", "ep", 1))}
            if "num_updates" in d:
                epochs.append(d)
    return inner, epochs, params


def curve(inner, epochs):
    rows = inner or epochs
    out = []
    for d in rows:
        # fairseq's hubert criterion already logs correct_{m,u}_0 divided by count_{m,u}_0
        acc_m, acc_u = d.get("correct_m_0"), d.get("correct_u_0")
        out.append((d["num_updates"], d.get("loss"), acc_m, acc_u))
    return out


def read_float(path):
    try:
        return float(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(work, models):
    res, curves = {}, {}
    for m in models:
        pt = {}
        for it in (1, 2):
            d = os.path.join(work, "pretrain", f"{m}_iter{it}")
            inner, epochs, params = parse_log(os.path.join(d, "train.log"))
            # train_wall in a train-epoch line is that epoch's training time
            updates = int(epochs[-1]["num_updates"]) if epochs else 0
            walls = [e.get("train_wall", 0.0) for e in epochs]
            pt[it] = {
                "curve": curve(inner, epochs),
                "params": params,
                "updates": updates,
                "sec_per_update": (sum(walls) / updates) if updates else None,
                "loss_final": epochs[-1].get("loss") if epochs else None,
                "peak_rss_mb": read_float(os.path.join(d, "peak_rss_mb.txt")),
            }
        ft_inner, ft_epochs, ft_params = parse_log(os.path.join(work, "finetune", m, "train.log"))
        dec = {}
        try:
            dec = json.load(open(os.path.join(work, "decode", m, "test.json")))
        except OSError:
            pass
        rss = [x for x in (pt[1]["peak_rss_mb"], pt[2]["peak_rss_mb"]) if x is not None]
        res[m] = {
            "params": pt[1]["params"],
            "wer_test": dec.get("wer"),
            "cer_test": dec.get("cer"),
            "sec_per_update": pt[1]["sec_per_update"],
            "peak_rss_mb": max(rss) if rss else None,
            "pretrain_loss_final": pt[2]["loss_final"] if pt[2]["loss_final"] is not None else pt[1]["loss_final"],
            "pretrain_iter1_loss_final": pt[1]["loss_final"],
            "pretrain_iter1_updates": pt[1]["updates"],
            "pretrain_iter2_updates": pt[2]["updates"],
            "pretrain_iter2_sec_per_update": pt[2]["sec_per_update"],
            "finetune_updates": int(ft_epochs[-1]["num_updates"]) if ft_epochs else None,
            "finetune_loss_final": ft_epochs[-1].get("loss") if ft_epochs else None,
            "finetune_sec_per_update": (sum(e.get("train_wall", 0) for e in ft_epochs) / ft_epochs[-1]["num_updates"])
            if ft_epochs else None,
            "finetune_params": ft_params,
            "finetune_peak_rss_mb": read_float(os.path.join(work, "finetune", m, "peak_rss_mb.txt")),
        }
        curves[m] = (pt[1]["curve"], pt[2]["curve"], curve(ft_inner, ft_epochs))

    wall = read_float(os.path.join(work, "wall_seconds.txt"))
    settings = {}
    try:
        settings = json.load(open(os.path.join(work, "settings.json")))
    except (OSError, ValueError):
        pass
    out = {"models": res, "wall_seconds": wall, "settings": settings}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(out, f, indent=1)

    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for m, (c1, c2, _) in curves.items():
            for it, c in ((1, c1), (2, c2)):
                if not c:
                    continue
                x = [r[0] for r in c]
                ls = "-" if it == 1 else "--"
                axes[0].plot(x, [r[1] for r in c], ls, label=f"{m} iter {it}")
                axes[1].plot(x, [r[2] for r in c], ls, label=f"{m} iter {it}")
                axes[2].plot(x, [r[3] for r in c], ls, label=f"{m} iter {it}")
        for ax, t in zip(axes, ("pre-training loss", "masked accuracy", "unmasked accuracy")):
            ax.set_title(t), ax.set_xlabel("updates"), ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(work, "pretrain_curves.png"), dpi=80)
        plots.append(("Pre-training curves (train, logged every few updates)", "pretrain_curves.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, (_, _, cf) in curves.items():
            if cf:
                ax.plot([r[0] for r in cf], [r[1] for r in cf], label=m)
        ax.set_title("fine-tuning CTC loss"), ax.set_xlabel("updates"), ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(work, "finetune_loss.png"), dpi=80)
        plots.append(("Fine-tuning CTC loss", "finetune_loss.png"))

        names = list(res)
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
        for ax, key, t in zip(axes, ("wer_test", "sec_per_update", "peak_rss_mb", "params"),
                              ("test WER (%)", "pre-training sec/update", "peak RSS (MB)", "parameters")):
            vals = [res[n][key] or 0 for n in names]
            ax.bar(names, vals, color=["C0", "C1", "C2"][: len(names)])
            ax.set_title(t)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
        fig.tight_layout()
        fig.savefig(os.path.join(work, "comparison.png"), dpi=80)
        plots.append(("WER, speed, memory, size", "comparison.png"))
    except Exception as err:  # plots are optional; the numbers are not
        print(f"[make_report] plots skipped: {err!r}", file=sys.stderr)

    fmt = lambda v, p=2: "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{p}f}")
    lines = ["# fairseq_mamba demo report", ""]
    if wall is not None:
        lines.append(f"Wall time of this run (setup included): **{wall / 60:.1f} min** ({wall:.0f} s).")
    if settings:
        lines.append(f"Settings: `{json.dumps(settings)}`")
    lines += ["", "| model | params | test WER % | test CER % | pre-train sec/update | peak RSS MB | final pre-train loss |",
              "|---|---|---|---|---|---|---|"]
    for m, r in res.items():
        lines.append(f"| {m} | {fmt(r['params'])} | {fmt(r['wer_test'])} | {fmt(r['cer_test'])} | "
                     f"{fmt(r['sec_per_update'])} | {fmt(r['peak_rss_mb'], 0)} | {fmt(r['pretrain_loss_final'], 3)} |")
    lines += ["", "Every number above is parsed from this run's logs (`pretrain/*/train.log`, `peak_rss_mb.txt`, "
              "`finetune/*/train.log`, `decode/*/test.json`); all of them are also in `results.json`.",
              "sec/update = summed `train_wall` of the iteration-1 epochs / updates; peak RSS = largest process of "
              "the pre-training runs; WER/CER from `fairseq_mamba/decode.py` (Viterbi CTC best path, no LM).", ""]
    wers = [r["wer_test"] for r in res.values() if r["wer_test"] is not None]
    if wers and min(wers) > 40:
        lines += ["**WER is far from the <40% target at this budget.** Pre-training and letters-CTC fine-tuning "
                  "of tiny models for a few hundred CPU updates do not get there; scale it up, e.g. "
                  "`DEMO_SCALE=8 bash run_scripts/demo.sh` (all train utterances, 8x updates; about 8x the "
                  "training time), or set `PT1_UPDATES`, `FT_UPDATES` directly.", ""]
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    for m in res:
        hyp = os.path.join(work, "decode", m, "test.hyp")
        ref = os.path.join(work, "decode", m, "test.ref")
        if os.path.exists(hyp):
            lines += [f"### {m}: first test utterances", "", "```"]
            for r, h in list(zip(open(ref).read().splitlines(), open(hyp).read().splitlines()))[:3]:
                lines += [f"REF: {r}", f"HYP: {h}"]
            lines += ["```", ""]
    with open(os.path.join(work, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(json.dumps({"models": {m: {k: res[m][k] for k in ("params", "wer_test", "cer_test", "sec_per_update",
                                                            "peak_rss_mb", "pretrain_loss_final")} for m in res}}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2:])
