"""An n-gram LM in ARPA format, estimated from transcripts, for LM decoding (stage 08).

    python -m fairseq_mamba.decoding.ngram_lm TRAIN.ltr OUT.arpa [--order 3] [--discount 0.75]

Tokens are whatever the lines hold, split at whitespace: the letters and ``|`` of a ``.ltr`` file
(a letter LM, as stage 08 uses, order 6) or the words of a ``.wrd`` file.

KenLM's ``lmplz`` is a C++ binary that pip does not install; KenLM (as loaded by flashlight's
decoder) reads ARPA files directly, so for the small transcript sets we decode with here a few
lines of Python are enough.  The model is interpolated absolute discounting (Ney et al., 1994)
with one discount ``D`` at every order:

    p(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * p(w | h')
    p(w)     = max(c(w) - D, 0) / N       +  D * N1+(.) / N * 1 / |V|     (|V| includes <unk>)

where ``c(h) = sum_w c(h w)`` counts ``h`` as a context, ``N1+(h .)`` the distinct words seen
after it and ``h'`` is ``h`` without its first word.  In ARPA's back-off form an interpolated
model stores, for every seen n-gram, its full interpolated probability, and for every context
the back-off weight ``D * N1+(h .) / c(h)``: an unseen ``h w`` then gets exactly the
interpolated mass ``bow(h) * p(w | h')``.  Every conditional distribution sums to one
(tests/test_lm_decode.py checks it through the ARPA file).
"""
import argparse
import math
from collections import Counter

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def read_sentences(path):
    """Token lists, one per line; an empty line is a ValueError naming the file and line."""
    sentences = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            words = line.split()
            if not words:
                raise ValueError(f"{path}, line {n}: empty transcript; remove the line or give it its words")
            sentences.append(words)
    if not sentences:
        raise ValueError(f"{path}: no transcripts to estimate an LM from")
    return sentences


def estimate(sentences, order=3, discount=0.75):
    """Return ``{n: {ngram tuple: (log10 prob, log10 back-off or None)}}`` for n = 1..order."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if not 0.0 < discount < 1.0:
        raise ValueError(f"discount must be in (0, 1), got {discount}")
    counts = {n: Counter() for n in range(1, order + 1)}
    for words in sentences:
        seq = [BOS] + list(words) + [EOS]
        for n in range(1, order + 1):
            counts[n].update(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))
    del counts[1][(BOS,)]  # <s> is a context only, never predicted
    vocab = sorted({w for (w,) in counts[1]} | {UNK})
    total = sum(counts[1].values())
    uniform = discount * len(counts[1]) / total / len(vocab)
    prob = {(w,): max(counts[1][(w,)] - discount, 0) / total + uniform for w in vocab}
    prob[(BOS,)] = 0.0
    bow = {}
    for n in range(2, order + 1):
        ctx_total, ctx_types = Counter(), Counter()
        for gram, c in counts[n].items():
            ctx_total[gram[:-1]] += c
            ctx_types[gram[:-1]] += 1
        bow.update({h: discount * ctx_types[h] / ctx_total[h] for h in ctx_total})
        for gram, c in counts[n].items():
            prob[gram] = (c - discount) / ctx_total[gram[:-1]] + bow[gram[:-1]] * _backed_off(prob, bow, gram[1:])
    return {
        n: {g: (_log10(p), _log10(bow[g]) if n < order and g in bow else None) for g, p in prob.items() if len(g) == n}
        for n in range(1, order + 1)
    }


def _backed_off(prob, bow, gram):
    """p(gram[-1] | gram[:-1]): the stored probability of a seen n-gram, else back off."""
    if gram in prob:
        return prob[gram]
    return bow.get(gram[:-1], 1.0) * _backed_off(prob, bow, gram[1:])


def _log10(p):
    return -99.0 if p <= 0 else math.log10(p)


def write_arpa(model, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n in sorted(model):
            f.write(f"ngram {n}={len(model[n])}\n")
        for n in sorted(model):
            f.write(f"\n\\{n}-grams:\n")
            for gram in sorted(model[n]):
                lp, bow = model[n][gram]
                f.write(f"{lp:.6f}\t{' '.join(gram)}" + (f"\t{bow:.6f}" if bow is not None else "") + "\n")
        f.write("\n\\end\\\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("transcripts", help="one transcript per line, tokens split at whitespace (train.ltr, train.wrd)")
    p.add_argument("out", help="ARPA file to write")
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--discount", type=float, default=0.75)
    a = p.parse_args(argv)
    model = estimate(read_sentences(a.transcripts), a.order, a.discount)
    write_arpa(model, a.out)
    print(f"{a.out}: " + ", ".join(f"{len(model[n])} {n}-grams" for n in sorted(model)))


if __name__ == "__main__":
    main()
