#!/usr/bin/env bash
# Stage 1: bundled corpus -> fairseq manifests.
# usage: run_scripts/01_manifests.sh [CORPUS_DIR=examples/corpus/data] [OUT_DIR=outputs/pipeline/data]
# CORPUS_DIR holds {split}.tsv (id<TAB>relative_flac_path<TAB>num_samples) and {split}.wrd.
# OUT_DIR gets {split}.tsv (first line: absolute audio root; then path<TAB>num_samples),
# {split}.wrd, {split}.ltr (letters, '|' word boundary) and dict.ltr.txt (letter counts, train).
# Splits: $SPLITS (default: every {train,valid,test}.tsv present). $TRAIN_UTTS keeps only the
# first N train utterances (default: all). Every audio file is checked (fairseq_mamba.checks.data_checks):
# a bad one stops the stage naming it; FAIRSEQ_MAMBA_BAD_LINES=skip leaves it out instead.
# Skipped when complete for the same inputs; refuses to overwrite other inputs' output (FORCE=1).
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n 2,10p "$0"; exit 0; fi
corpus=$(abspath "${1:-$ROOT/examples/corpus/data}")
out=$(abspath "${2:-$ROOT/outputs/pipeline/data}")
splits=${SPLITS:-}
if [[ -z "$splits" ]]; then
  for s in train valid test; do [[ -f "$corpus/$s.tsv" ]] && splits="$splits $s"; done
fi
[[ -n "${splits// /}" ]] || { echo "no {train,valid,test}.tsv in $corpus" >&2; exit 1; }
inputs=(); for s in $splits; do inputs+=("$corpus/$s.tsv" "$corpus/$s.wrd"); done
stamp="manifests of $corpus ($(fingerprint "${inputs[@]}")) splits:$splits train_utts:${TRAIN_UTTS:-all} bad_lines:${FAIRSEQ_MAMBA_BAD_LINES:-error}"
needs_run "$out/.done" "$stamp" "manifests in $out" "$out"/*.tsv || exit 0
mkdir -p "$out"
TRAIN_UTTS=${TRAIN_UTTS:-} "$PY" - "$corpus" "$out" $splits <<'PYEOF'
import collections, os, sys
from fairseq_mamba.checks import data_checks as dc

corpus, out, splits = sys.argv[1], sys.argv[2], sys.argv[3:]
train_utts = int(os.environ["TRAIN_UTTS"]) if os.environ.get("TRAIN_UTTS") else None
letters = collections.Counter()
checked = {}  # every split is read and checked before anything is written
for split in splits:
    src = os.path.join(corpus, f"{split}.tsv")
    entries = []
    for i, line in enumerate(open(src), start=1):
        f = line.rstrip("\n").split("\t")
        if len(f) < 3 or not f[2].strip().isdigit():
            continue  # header or blank line
        entries.append(dc.Entry(i, f[1], int(f[2])))
    # relative paths are relative to the corpus dir (or its parent)
    root = corpus
    if entries and not os.path.exists(os.path.join(corpus, entries[0].rel)):
        root = os.path.dirname(corpus)
    wrd_path = os.path.join(corpus, f"{split}.wrd")
    wrds = [l.strip() for l in open(wrd_path)] if os.path.exists(wrd_path) else None
    if wrds is not None:
        wrds = wrds[: len(entries)] if len(wrds) > len(entries) and not any(wrds[len(entries):]) else wrds
        if len(wrds) != len(entries):
            sys.exit(f"DataError: {wrd_path} has {len(wrds)} transcripts for the {len(entries)} "
                     f"utterances of {src}.\n  Fix: one transcript line per utterance, in order")
    if split == "train" and train_utts:
        entries, wrds = entries[:train_utts], (wrds[:train_utts] if wrds is not None else None)
    try:
        bad = dc.settle(dc.check_audio(dc.Manifest(src, root, entries), 16000, cache=False), src)
    except dc.DataError as err:
        sys.exit(f"DataError: {err}")
    if bad:
        print(f"{split}: left out {len(bad)} bad line(s) of {src} ({dc.BAD_LINES_ENV}=skip)")
    keep = [i for i, e in enumerate(entries) if e.line not in bad]
    checked[split] = (root, [entries[i] for i in keep], None if wrds is None else [wrds[i] for i in keep])
for split, (root, entries, wrds) in checked.items():
    tmp = lambda p: os.path.join(out, p + ".tmp")
    with open(tmp(f"{split}.tsv"), "w") as t:
        t.write(os.path.abspath(root) + "\n")
        for e in entries:
            t.write(f"{e.rel}\t{e.samples}\n")
    files = [f"{split}.tsv"]
    if wrds is not None:
        with open(tmp(f"{split}.wrd"), "w") as w, open(tmp(f"{split}.ltr"), "w") as l:
            for s in wrds:
                s = " ".join(s.upper().split())
                w.write(s + "\n")
                ltr = " ".join(list(s.replace(" ", "|"))) + " |"
                l.write(ltr + "\n")
                if split == "train":
                    letters.update(ltr.split())
        files += [f"{split}.wrd", f"{split}.ltr"]
    for f in files:
        os.replace(tmp(f), os.path.join(out, f))
    # the audio of the manifest just written is checked: later stages only stat the files
    dc.save_check(dc.read_manifest(os.path.join(out, f"{split}.tsv")), 16000, [])
    print(f"{split}: {len(entries)} utterances, {sum(e.samples for e in entries)/16000/3600:.3f} h, root {root}")
if letters:
    with open(os.path.join(out, "dict.ltr.txt.tmp"), "w") as d:
        for c, n in sorted(letters.items(), key=lambda x: (-x[1], x[0])):
            d.write(f"{c} {n}\n")
    os.replace(os.path.join(out, "dict.ltr.txt.tmp"), os.path.join(out, "dict.ltr.txt"))
    print(f"dict.ltr.txt: {len(letters)} symbols")
PYEOF
mark_done "$out/.done" "$stamp"
log "manifests written to $out"
