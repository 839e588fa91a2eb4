# One short progress line per fairseq 'simple' log line worth showing (used by 05 and 07):
#   fairseq-hydra-train ... | awk -v tag="pre-train mamba_hubert iter 1" -f run_scripts/progress.awk >&2
# train_inner lines -> "[tag] update 40/300 loss 5.62 acc masked 0.071 unmasked 0.078 | 52 s";
# valid lines -> "[tag] valid @ 75: loss 229.5 letter err 98.2% WER 100.0%"; errors and the final
# "done training" line pass through unchanged.
function get(key,   re, s) {
  re = "[ ,|]" key "[= ][-+0-9.e]+"
  if (!match($0, re)) return ""
  s = substr($0, RSTART + length(key) + 2, RLENGTH - length(key) - 2)
  return s
}
function opt(label, key,   v) { v = get(key); return v == "" ? "" : sprintf(" %s %.4g", label, v) }
/\]\[train_inner\]\[/ {
  printf "[%s] update %s%s%s%s%s%s | %s s\n", tag, get("num_updates"), (total ? "/" total : ""),
    opt("loss", "loss"), opt("acc masked", "correct_m_0"), opt("unmasked", "correct_u_0"), opt("lr", "lr"),
    get("wall")
  fflush(); next
}
/\]\[valid\]\[/ && / - epoch / {
  printf "[%s] valid @ %s:%s%s%s%s%s\n", tag, get("num_updates"), opt("loss", "loss"),
    opt("acc masked", "correct_m_0"), opt("unmasked", "correct_u_0"), opt("letter err %", "uer"), opt("WER %", "wer")
  fflush(); next
}
/done training|Error|error|Traceback/ { print; fflush() }
