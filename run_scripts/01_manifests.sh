#!/usr/bin/env bash
# Stage 1: bundled corpus -> fairseq manifests.
# usage: run_scripts/01_manifests.sh [CORPUS_DIR=examples/corpus/data] [OUT_DIR=outputs/pipeline/data]
# CORPUS_DIR holds {split}.tsv (id<TAB>relative_flac_path<TAB>num_samples) and {split}.wrd.
# OUT_DIR gets {split}.tsv (first line: absolute audio root; then path<TAB>num_samples),
# {split}.wrd, {split}.ltr (letters, '|' word boundary) and dict.ltr.txt (letter counts, train).
# Splits: $SPLITS (default: every {train,valid,test}.tsv present). $TRAIN_UTTS keeps only the
# first N train utterances (default: all). Skips if outputs are complete.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n 2,7p "$0"; exit 0; fi
corpus=$(abspath "${1:-$ROOT/examples/corpus/data}")
out=$(abspath "${2:-$ROOT/outputs/pipeline/data}")
splits=${SPLITS:-}
if [[ -z "$splits" ]]; then
  for s in train valid test; do [[ -f "$corpus/$s.tsv" ]] && splits="$splits $s"; done
fi
[[ -n "${splits// /}" ]] || { echo "no {train,valid,test}.tsv in $corpus" >&2; exit 1; }
stamp="$corpus $splits ${TRAIN_UTTS:-all}"
if [[ -f "$out/.done" && "$(cat "$out/.done")" == "$stamp" ]]; then
  log "manifests complete in $out, skipping"; exit 0
fi
rm -f "$out/.done"; mkdir -p "$out"
TRAIN_UTTS=${TRAIN_UTTS:-} "$PY" - "$corpus" "$out" $splits <<'PYEOF'
import collections, os, sys
corpus, out, splits = sys.argv[1], sys.argv[2], sys.argv[3:]
train_utts = int(os.environ["TRAIN_UTTS"]) if os.environ.get("TRAIN_UTTS") else None
letters = collections.Counter()
for split in splits:
    rows = []
    for line in open(os.path.join(corpus, f"{split}.tsv")):
        f = line.rstrip("\n").split("\t")
        if len(f) < 3 or not f[2].strip().isdigit():
            continue  # header or blank line
        rows.append((f[0], f[1], int(f[2])))
    # relative paths are relative to the corpus dir (or its parent)
    root = corpus
    if rows and not os.path.exists(os.path.join(corpus, rows[0][1])):
        root = os.path.dirname(corpus)
    missing = [r[1] for r in rows if not os.path.exists(os.path.join(root, r[1]))]
    if missing:
        sys.exit(f"{split}: {len(missing)} audio files missing, e.g. {missing[0]} under {root}")
    wrd_path = os.path.join(corpus, f"{split}.wrd")
    wrds = [l.strip() for l in open(wrd_path)] if os.path.exists(wrd_path) else None
    if wrds is not None:
        wrds = wrds[: len(rows)] if len(wrds) > len(rows) and not any(wrds[len(rows):]) else wrds
        assert len(wrds) == len(rows), f"{split}: {len(wrds)} transcripts for {len(rows)} utterances"
    if split == "train" and train_utts:
        rows, wrds = rows[:train_utts], (wrds[:train_utts] if wrds is not None else None)
    tmp = lambda p: os.path.join(out, p + ".tmp")
    with open(tmp(f"{split}.tsv"), "w") as t:
        t.write(os.path.abspath(root) + "\n")
        for _, rel, n in rows:
            t.write(f"{rel}\t{n}\n")
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
    print(f"{split}: {len(rows)} utterances, {sum(r[2] for r in rows)/16000/3600:.3f} h, root {root}")
if letters:
    with open(os.path.join(out, "dict.ltr.txt"), "w") as d:
        for c, n in sorted(letters.items(), key=lambda x: (-x[1], x[0])):
            d.write(f"{c} {n}\n")
    print(f"dict.ltr.txt: {len(letters)} symbols")
PYEOF
echo "$stamp" >"$out/.done"
log "manifests written to $out"
