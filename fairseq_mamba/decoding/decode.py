"""CTC decoding of a fine-tuned ``hubert_ctc`` checkpoint, with WER and CER: Viterbi, and with a letter LM.

    python -m fairseq_mamba.decoding.decode FT_CKPT MANIFEST_DIR SPLIT OUT_DIR [--lm LM.arpa [--tune-split valid]]

What it does (and why it is not fairseq's ``examples/speech_recognition/new/infer.py``):
infer.py's ``viterbi`` decoder is ``W2lViterbiDecoder``, which imports flashlight's sequence
bindings even without an LM, and its ``kenlm`` decoder needs a lexicon; neither fits here.
Without an LM or lexicon the Viterbi best path through CTC posteriors is simply the per-frame
argmax, so this script

1. loads the checkpoint with fairseq's ``load_model_ensemble_and_task`` (``task.data`` and
   ``task.label_dir`` pointed at MANIFEST_DIR, so ``dict.ltr.txt`` is read from there);
2. reads each utterance of ``SPLIT.tsv`` with soundfile (16 kHz mono expected), layer-normalises
   the waveform when the task says ``normalize`` (as fairseq's dataset does);
3. takes ``argmax`` of the log-posteriors per frame, merges repeats, drops the blank (index 0,
   ``<s>``, which fairseq's ``ctc`` criterion uses as blank for this task), padding and ``</s>``;
4. turns letters into words (``post_process(..., "letter")``: drop spaces, ``|`` -> space);
5. scores against ``SPLIT.wrd`` (or ``SPLIT.ltr``): WER = word edit distance / reference words,
   CER = character edit distance (spaces included) / reference characters, both in percent,
   summed over the corpus.

With ``--lm`` (an ARPA letter n-gram, ``fairseq_mamba.decoding.ngram_lm``) it also beam-searches with that
LM (``lm_decoder.LetterLMDecoder``): LM weight and word-boundary score are chosen on
``--tune-split`` (lowest WER over the ``--lm-weights`` x ``--sil-scores`` grid; the split decoded
is never used to choose), then SPLIT is decoded once with them.

Writes OUT_DIR/SPLIT.hyp, SPLIT.ref (one line per utterance) and SPLIT.json (``wer``, ``cer``;
with ``--lm`` also ``lm``: its WER, CER, the chosen settings and the tuning grid's WERs) and,
with ``--lm``, SPLIT.lm.hyp.
"""
import argparse
import json
import os
import time


def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rates(refs, hyps):
    """Corpus WER and CER in percent: total edits / total reference words (characters)."""
    assert len(refs) == len(hyps)
    we = wn = ce = cn = 0
    for r, h in zip(refs, hyps):
        rw, hw = r.split(), h.split()
        we += edit_distance(rw, hw)
        wn += len(rw)
        rc, hc = " ".join(rw), " ".join(hw)
        ce += edit_distance(rc, hc)
        cn += len(rc)
    return 100.0 * we / max(wn, 1), 100.0 * ce / max(cn, 1)


def ctc_best_path(token_ids, blank=0, drop=()):
    """Merge repeated frame labels, then drop blanks and the ``drop`` ids (padding, end of sentence)."""
    out, last = [], None
    for t in token_ids:
        if t != last and t != blank and t not in drop:
            out.append(t)
        last = t
    return out


def letters_to_words(symbols):
    return "".join(symbols).replace("|", " ").strip()


def load(ckpt, data):
    """The fine-tuned model (eval mode) and its task, dictionaries read from ``data``."""
    import fairseq_mamba  # noqa: F401  (registers mamba_hubert, fixes hubert_ctc, checkpoint loading)
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": data, "label_dir": data}
    )
    return models[0].eval(), task


def read_split(data, split):
    """(audio root, manifest rows, reference transcripts) of one split."""
    lines = open(os.path.join(data, f"{split}.tsv")).read().splitlines()
    root, items = lines[0].strip(), [l.split("\t") for l in lines[1:] if l.strip()]
    ref_path = os.path.join(data, f"{split}.wrd")
    if os.path.exists(ref_path):
        refs = [l.strip() for l in open(ref_path)][: len(items)]
    else:
        refs = [letters_to_words(l.split()) for l in open(os.path.join(data, f"{split}.ltr"))][: len(items)]
    return root, items, refs


def posteriors(model, task, root, items):
    """Yield each utterance's (T, V) CTC log-posteriors and its length in seconds."""
    import numpy as np
    import soundfile as sf
    import torch
    import torch.nn.functional as F

    normalize = bool(getattr(task.cfg, "normalize", False))
    with torch.no_grad():
        for rel, *_ in items:
            wav, sr = sf.read(os.path.join(root, rel), dtype="float32")
            if wav.ndim == 2:
                wav = wav.mean(-1)
            if sr != task.cfg.sample_rate:
                raise ValueError(f"{rel}: {sr} Hz, expected {task.cfg.sample_rate} Hz mono")
            x = torch.from_numpy(np.ascontiguousarray(wav))
            if normalize:
                x = F.layer_norm(x, x.shape)
            net_output = model(source=x[None], padding_mask=None)
            yield model.get_normalized_probs(net_output, log_probs=True)[:, 0], len(wav) / sr  # (T, V)


def path_to_words(ids, tgt_dict):
    """A frame-level path -> words; as fairseq's ctc criterion scores its WER: no blank (0),
    padding or </s> (<unk> stays)."""
    toks = ctc_best_path(ids, blank=0, drop=(tgt_dict.pad(), tgt_dict.eos()))
    return letters_to_words([tgt_dict[t] for t in toks])


def lm_search(lm, tgt_dict, tune, lprobs, weights, sil_scores, beam, beam_size_token=10):
    """Choose (LM weight, word-boundary score) on ``tune`` = (posteriors, refs); decode ``lprobs``."""
    from .lm_decoder import LetterLMDecoder, grid

    dec, tried = LetterLMDecoder(lm, tgt_dict.symbols, beam=beam, beam_size_token=beam_size_token), []
    for w, sil in grid(weights, sil_scores):
        tried.append((error_rates(tune[1], [path_to_words(dec(x, w, sil), tgt_dict) for x in tune[0]])[0], w, sil))
    tune_wer, w, sil = min(tried, key=lambda t: t[0])  # min keeps the first of equal WERs
    hyps = [path_to_words(dec(x, w, sil), tgt_dict) for x in lprobs]
    info = {"arpa": os.path.abspath(lm), "lm_weight": w, "sil_score": sil, "beam": beam,
            "beam_size_token": dec.beam_size_token, "tune_wer": round(tune_wer, 3),
            "grid": [{"lm_weight": gw, "sil_score": gs, "wer": round(e, 3)} for e, gw, gs in tried]}
    return hyps, info


def decode(ckpt, data, split, out_dir, lm=None, tune_split="valid", lm_weights=(0.5, 1.0, 1.5, 2.0, 3.0),
           sil_scores=(-1.0, 0.0, 1.0), beam=100, beam_size_token=10):
    if lm is not None and tune_split == split:
        raise ValueError(f"--tune-split {tune_split} is the split decoded: choosing the LM weight on it "
                         f"would flatter its WER; tune on another split (valid)")
    model, task = load(ckpt, data)
    tgt_dict = task.target_dictionary
    root, items, refs = read_split(data, split)
    t0, audio_s, lprobs = time.time(), 0.0, []
    for lp, seconds in posteriors(model, task, root, items):
        lprobs.append(lp)
        audio_s += seconds
    hyps = [path_to_words(lp.argmax(-1).tolist(), tgt_dict) for lp in lprobs]
    wer, cer = error_rates(refs, hyps)
    os.makedirs(out_dir, exist_ok=True)
    write_lines(os.path.join(out_dir, f"{split}.hyp"), hyps)
    write_lines(os.path.join(out_dir, f"{split}.ref"), refs)
    result = {
        "split": split,
        "checkpoint": ckpt,
        "utterances": len(hyps),
        "wer": round(wer, 3),
        "cer": round(cer, 3),
        "audio_seconds": round(audio_s, 2),
        "decoder": "viterbi (CTC best path, no LM)",
    }
    if lm is not None:
        troot, titems, trefs = read_split(data, tune_split)
        tune = ([lp for lp, _ in posteriors(model, task, troot, titems)], trefs)
        lm_hyps, info = lm_search(lm, tgt_dict, tune, lprobs, lm_weights, sil_scores, beam, beam_size_token)
        lm_wer, lm_cer = error_rates(refs, lm_hyps)
        write_lines(os.path.join(out_dir, f"{split}.lm.hyp"), lm_hyps)
        result["lm"] = {"wer": round(lm_wer, 3), "cer": round(lm_cer, 3), "tuned_on": tune_split,
                        "decoder": "beam search, letter n-gram LM, no lexicon", **info}
    result["decode_seconds"] = round(time.time() - t0, 2)  # both decoders, the tuning included
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r, h in list(zip(refs, hyps))[:3]:
        print(f"REF: {r}\nHYP: {h}")
    print(json.dumps({k: v for k, v in result.items() if k != "lm"}))
    if lm is not None:
        print(json.dumps({k: v for k, v in result["lm"].items() if k != "grid"}))
    return result


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(l + "\n" for l in lines))


def floats(text):
    return tuple(float(v) for v in text.split(","))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("data", help="manifest dir: SPLIT.tsv, SPLIT.wrd or .ltr, dict.ltr.txt")
    p.add_argument("split")
    p.add_argument("out_dir")
    p.add_argument("--lm", help="ARPA letter n-gram (python -m fairseq_mamba.decoding.ngram_lm train.ltr LM.arpa --order 6)")
    p.add_argument("--tune-split", default="valid", help="split that chooses the LM weight and word score")
    p.add_argument("--lm-weights", type=floats, default=(0.5, 1.0, 1.5, 2.0, 3.0))
    p.add_argument("--sil-scores", type=floats, default=(-1.0, 0.0, 1.0))
    p.add_argument("--beam", type=int, default=100)
    p.add_argument("--beam-size-token", type=int, default=10,
                   help="letters tried per frame, most likely first (0: all of them)")
    a = p.parse_args(argv)
    decode(a.ckpt, a.data, a.split, a.out_dir, a.lm, a.tune_split, a.lm_weights, a.sil_scores, a.beam, a.beam_size_token or None)


if __name__ == "__main__":
    main()
