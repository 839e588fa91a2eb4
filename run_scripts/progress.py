"""One short progress line per fairseq 'simple' log line worth showing (used by 05 and 07):

    fairseq-hydra-train ... | python run_scripts/progress.py TAG [TOTAL_UPDATES] >&2

train_inner lines -> "[TAG] update 40/300 loss 5.62 acc masked 0.071 unmasked 0.078 lr 0.002 | 52 s";
valid lines -> "[TAG] valid @ 75: loss 229.5 letter err % 98.2 WER % 100"; errors and the final
"done training" line pass through.  Reads line by line (mawk, say, would wait for a full buffer).
"""
import re
import sys


def fields(line, pairs):
    out = []
    for label, key in pairs:
        m = re.search(r"[ ,|]" + key + r"[= ]([-+0-9.e]+)", line)
        if m:
            out.append(f"{label} {float(m.group(1)):.4g}")
    return " ".join(out)


def main(tag, total=""):
    acc = (("acc masked", "correct_m_0"), ("unmasked", "correct_u_0"))
    for line in sys.stdin:
        if "][train_inner][" in line:
            upd = re.search(r"num_updates=(\d+)", line)
            wall = re.search(r"[ ,]wall=(\d+)", line)
            print(f"[{tag}] update {upd.group(1) if upd else '?'}{'/' + total if total else ''} "
                  f"{fields(line, (('loss', 'loss'),) + acc + (('lr', 'lr'),))} | {wall.group(1) if wall else '?'} s",
                  flush=True)
        elif "][valid][" in line and " - epoch " in line:
            upd = re.search(r"num_updates (\d+)", line)
            print(f"[{tag}] valid @ {upd.group(1) if upd else '?'}: "
                  f"{fields(line, (('loss', 'loss'),) + acc + (('letter err %', 'uer'), ('WER %', 'wer')))}", flush=True)
        elif re.search(r"done training|Error|error|Traceback", line):
            print(line, end="", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
