"""No-LM Viterbi CTC decoding of a fine-tuned ``hubert_ctc`` checkpoint, with WER and CER.

    python -m fairseq_mamba.decode FT_CKPT MANIFEST_DIR SPLIT OUT_DIR

What it does (and why it is not fairseq's ``examples/speech_recognition/new/infer.py``):
infer.py's ``viterbi`` decoder is ``W2lViterbiDecoder``, which imports flashlight's text
decoder bindings even without an LM; flashlight is not installable here.  Without an LM or lexicon
the Viterbi best path through CTC posteriors is simply the per-frame argmax, so this script

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

Writes OUT_DIR/SPLIT.hyp, SPLIT.ref (one line per utterance) and SPLIT.json.
"""
import json
import os
import sys
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


def decode(ckpt, data, split, out_dir):
    import numpy as np
    import soundfile as sf
    import torch
    import torch.nn.functional as F

    import fairseq_mamba  # noqa: F401  (registers mamba_hubert, fixes hubert_ctc, checkpoint loading)
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": data, "label_dir": data}
    )
    model = models[0].eval()
    tgt_dict = task.target_dictionary
    blank = 0
    normalize = bool(getattr(task.cfg, "normalize", False))

    lines = open(os.path.join(data, f"{split}.tsv")).read().splitlines()
    root, items = lines[0].strip(), [l.split("\t") for l in lines[1:] if l.strip()]
    ref_path = os.path.join(data, f"{split}.wrd")
    if os.path.exists(ref_path):
        refs = [l.strip() for l in open(ref_path)][: len(items)]
    else:
        refs = [letters_to_words(l.split()) for l in open(os.path.join(data, f"{split}.ltr"))][: len(items)]

    hyps, t0, audio_s = [], time.time(), 0.0
    with torch.no_grad():
        for rel, *_ in items:
            wav, sr = sf.read(os.path.join(root, rel), dtype="float32")
            if wav.ndim == 2:
                wav = wav.mean(-1)
            if sr != task.cfg.sample_rate:
                raise ValueError(f"{rel}: {sr} Hz, expected {task.cfg.sample_rate} Hz mono")
            audio_s += len(wav) / sr
            x = torch.from_numpy(np.ascontiguousarray(wav))
            if normalize:
                x = F.layer_norm(x, x.shape)
            net_output = model(source=x[None], padding_mask=None)
            lprobs = model.get_normalized_probs(net_output, log_probs=True)  # (T, B, V)
            ids = lprobs[:, 0].argmax(-1).tolist()
            # as fairseq's ctc criterion scores its WER: no blank, padding or </s> (<unk> stays)
            toks = ctc_best_path(ids, blank=blank, drop=(tgt_dict.pad(), tgt_dict.eos()))
            hyps.append(letters_to_words([tgt_dict[t] for t in toks]))
    wer, cer = error_rates(refs, hyps)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{split}.hyp"), "w") as f:
        f.write("".join(h + "\n" for h in hyps))
    with open(os.path.join(out_dir, f"{split}.ref"), "w") as f:
        f.write("".join(r + "\n" for r in refs))
    result = {
        "split": split,
        "checkpoint": ckpt,
        "utterances": len(hyps),
        "wer": round(wer, 3),
        "cer": round(cer, 3),
        "decode_seconds": round(time.time() - t0, 2),
        "audio_seconds": round(audio_s, 2),
        "decoder": "viterbi (CTC best path, no LM)",
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r, h in list(zip(refs, hyps))[:3]:
        print(f"REF: {r}\nHYP: {h}")
    print(json.dumps(result))
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print(__doc__)
        raise SystemExit(2)
    decode(*argv)


if __name__ == "__main__":
    main()
