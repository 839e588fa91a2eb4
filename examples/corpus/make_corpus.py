#!/usr/bin/env python3
"""Generate the bundled synthetic speech corpus (espeak-ng + fortune-mod text).

Every utterance is rendered by libespeak-ng (through ctypes) in a *fresh* forked
process: espeak-ng keeps wave-generator state (pitch flutter, etc.) across
utterances, so rendering each one in a clean process is what makes the output
bit-exact reproducible and independent of generation order.

Output layout (see README.md for the data card):
  DATA/{split}/{id}.flac  16 kHz mono 16-bit FLAC
  DATA/{split}.tsv        id  path  num_samples  speaker  rate  pitch  range
  DATA/{split}.wrd        upper-case transcript, one line per utterance
  DATA/{split}.phn        one phone per 10 ms frame (num_samples / 160 labels)
  DATA/{split}.spk        speaker (= espeak voice+variant) per utterance
  DATA/{split}.txt        the exact text given to espeak-ng (with punctuation)
  DATA/phones.txt         phone inventory with frame counts per split
  DATA/dict.phn.txt       the same, fairseq Dictionary format ("phone count")

Regenerate:  python examples/corpus/make_corpus.py --out examples/corpus/data
Needs: apt-get install espeak-ng fortunes fortunes-min wamerican; numpy,
scipy, soundfile.
"""
import argparse
import ctypes
import ctypes.util
import multiprocessing as mp
import os
import random
import re
import sys
import time
from collections import Counter

import numpy as np

SR = 16000
ESPEAK_SR = 22050
HOP = 160                     # 10 ms frames at 16 kHz -> 100 Hz labels
PAD = 1600                    # 100 ms of silence added at both ends
SIL = "sil"                   # every espeak pause phoneme ("_", "_:", ...) maps here
FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_FILES = [             # Debian 'fortunes' + 'fortunes-min'; offensive/
    "art", "computers", "cookie", "education", "food", "fortunes", "goedel",  # odd
    "humorists", "kids", "law", "literature", "magic", "medicine",            # files
    "miscellaneous", "news", "paradoxum", "people", "pets", "platitudes",     # left
    "riddles", "science", "songs-poems", "sports", "startrek", "tao",         # out
    "wisdom", "work",
]
DICT = "/usr/share/dict/words"
BLOCK = set("""sex sexy sexual sexually rape raped naked nude breast breasts
kill killed killing kills murder murdered suicide drunk drug drugs damn damned
hell god jesus christ bible church religion religious pray prayer atheist gun
guns bomb nigger jew jews jewish negro whore hooker prostitute penis virgin
bitch bastard ass butt piss shit fuck crap lesbian gay homosexual""".split())
ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Capt|Lt|Rev|vs|etc|Inc|"
                    r"Ltd|Co|No|Vol|ca|e\.g|i\.e)\.|[A-Za-z]\.[A-Za-z]\.")
WORD_RE = re.compile(r"^[a-z]+('[a-z]+)?$")

LANGS_SEEN = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbclan"]
LANGS_HELDOUT = ["en-us-nyc", "en-gb-x-gbcwmd"]
VARIANTS_SEEN = ["m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4",
                 "klatt", "klatt3", "Andy", "Annie", "max", "steph"]
VARIANTS_HELDOUT = ["m7", "f5", "klatt2", "linda"]
RATE = (140, 200)             # words per minute
PITCH = (30, 70)              # espeak 0..100 (50 = voice default)
PRANGE = (30, 80)             # pitch range 0..100
VOLUME = 75                   # espeak amplitude (default 100 can clip)


def _lib_path():
    for name in ("libespeak-ng.so.1", ctypes.util.find_library("espeak-ng")):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            pass
    raise SystemExit("libespeak-ng.so.1 not found: install it with "
                     "`apt-get install espeak-ng` (Debian/Ubuntu)")


class _Event(ctypes.Structure):   # espeak_EVENT from speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                       ctypes.POINTER(_Event))


def _render(job):
    """Runs in a fresh child process: synthesise one utterance.

    job = (text, voice, rate, pitch, prange).  Returns (int16 audio at 16 kHz,
    list of frame labels).  Frame i covers samples [160 i, 160 i + 160) and is
    labelled with the phoneme whose espeak PHONEME event (sample position,
    rescaled to 16 kHz, +PAD) is the last one at or before the frame centre
    160 i + 80; frames before the first event are 'sil'.
    """
    from scipy.signal import resample_poly   # imported by render_many before forking
    text, voice, rate, pitch, prange = job
    lib = ctypes.CDLL(_lib_path())
    # AUDIO_OUTPUT_SYNCHRONOUS=2, espeakINITIALIZE_PHONEME_EVENTS=1, DONT_EXIT=0x8000
    if lib.espeak_Initialize(2, 0, None, 0x0001 | 0x8000) != ESPEAK_SR:
        raise RuntimeError("espeak_Initialize failed or unexpected sample rate")
    chunks, events = [], []

    def callback(wav, n, ev):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while ev[i].type != 0:                   # espeakEVENT_LIST_TERMINATED
            if ev[i].type == 7:                  # espeakEVENT_PHONEME
                events.append((ev[i].sample, ev[i].id.decode("ascii")))
            i += 1
        return 0

    cb = _CB(callback)
    lib.espeak_SetSynthCallback(cb)
    ctypes.CDLL(None).srand(12345)                # klatt noise uses rand()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"espeak voice {voice!r} not available")
    for param, val in ((1, rate), (2, VOLUME), (3, pitch), (4, prange)):  # RATE,VOL,PITCH,RANGE
        lib.espeak_SetParameter(param, int(val), 0)
    data = text.encode("utf-8") + b"\0"
    # position 0, POS_CHARACTER, no end, espeakCHARS_UTF8
    if lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None) != 0:
        raise RuntimeError("espeak_Synth failed")
    lib.espeak_Synchronize()
    wav = np.concatenate(chunks).astype(np.float64)
    y = resample_poly(wav, SR // 50, ESPEAK_SR // 50)     # 320 / 441
    n = -(-(len(y) + 2 * PAD) // HOP) * HOP
    audio = np.zeros(n, np.int16)
    audio[PAD:PAD + len(y)] = np.clip(np.round(y), -32768, 32767).astype(np.int16)
    pos = np.array([PAD + round(s * SR / ESPEAK_SR) for s, _ in events], np.int64)
    names = [SIL if p.startswith("_") else p for _, p in events]
    centres = np.arange(n // HOP) * HOP + HOP // 2
    idx = np.searchsorted(pos, centres, side="right") - 1
    labels = [SIL if k < 0 else names[k] for k in idx]
    return audio, labels


def render_many(jobs, workers=2):
    """Render jobs, each in its own fresh process (bit-exact, order independent)."""
    _lib_path()
    import scipy.signal  # noqa: F401  (import once here, not in every child)
    with mp.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(_render, jobs, chunksize=1)


def load_sentences():
    """Return a list of (speak_text, transcript) from the fortune files."""
    if not os.path.isdir(FORTUNE_DIR):
        raise SystemExit(f"{FORTUNE_DIR} missing: apt-get install fortunes fortunes-min")
    if not os.path.exists(DICT):
        raise SystemExit(f"{DICT} missing: apt-get install wamerican")
    with open(DICT, encoding="utf-8", errors="ignore") as f:
        vocab = {w.strip().lower() for w in f}
    out, seen = [], set()
    for name in FORTUNE_FILES:
        with open(os.path.join(FORTUNE_DIR, name + ".u8"), encoding="utf-8") as f:
            entries = f.read().split("\n%\n")
        for entry in entries:
            lines = [ln for ln in entry.split("\n")
                     if not re.match(r"^\s*(--|~~|\u2014)", ln)]  # attributions
            body = " ".join(ln.strip() for ln in lines)
            body = body.replace("\u2019", "'").replace("--", ", ")
            if ABBREV.search(body) or re.search(r"[:;]\s*$", body):
                continue
            for sent in re.split(r"(?<=[.!?])\s+", body):
                item = _clean(sent, vocab)
                if item and item[1] not in seen:
                    seen.add(item[1])
                    out.append(item)
    return out


def _clean(sent, vocab):
    sent = sent.strip().strip('"').strip()
    if not re.fullmatch(r"[A-Za-z ',;.!?\"()-]+[.!?]", sent) or "''" in sent:
        return None
    if re.search(r"\b[A-Z]{2,}\b|\b[b-hj-zB-HJ-Z]\b", sent):   # acronyms/letters
        return None
    sent = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", sent)
    toks = re.findall(r"[A-Za-z']+|[,;.!?]", sent.replace('"', " "))
    words, speak = [], []
    for t in toks:
        if t in ",;":
            if speak and speak[-1] != ",":
                speak.append(",")
            continue
        if t in ".!?":
            if words:
                break
            continue
        w = t.strip("'").lower()
        if not WORD_RE.match(w) or w not in vocab or w in BLOCK:
            return None
        words.append(w)
        speak.append(w if w != "i" and not w.startswith("i'") else w.upper())
    if not 4 <= len(words) <= 20 or words != [w.lower() for w in speak if w != ","]:
        return None
    end = sent[-1]
    text = " ".join(speak).replace(" ,", ",").rstrip(",") + end
    return text, " ".join(words).upper()


def voice_for(split, k, seed):
    rng = random.Random(f"{seed}/{split}/{k}")
    if split == "test" and k % 2 == 1:           # held-out speakers / voice settings
        if rng.random() < 0.5:
            lang, var = rng.choice(LANGS_HELDOUT), rng.choice(VARIANTS_SEEN + VARIANTS_HELDOUT)
        else:
            lang, var = rng.choice(LANGS_SEEN), rng.choice(VARIANTS_HELDOUT)
    else:
        lang, var = rng.choice(LANGS_SEEN), rng.choice(VARIANTS_SEEN)
    return f"{lang}+{var}", rng.randint(*RATE), rng.randint(*PITCH), rng.randint(*PRANGE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    ap.add_argument("--train-minutes", type=float, default=30.2)
    ap.add_argument("--valid-minutes", type=float, default=2.0)
    ap.add_argument("--test-minutes", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    import soundfile as sf
    _lib_path()
    t0 = time.time()
    sents = load_sentences()
    random.Random(args.seed).shuffle(sents)
    print(f"{len(sents)} candidate sentences", file=sys.stderr)
    phone_counts, pos = {}, 0
    for split, minutes in (("test", args.test_minutes), ("valid", args.valid_minutes),
                           ("train", args.train_minutes)):
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
        rows, total = [], 0
        while total < minutes * 60 * SR:
            batch = sents[pos:pos + 32]
            if not batch:
                raise SystemExit("ran out of sentences")
            voices = [voice_for(split, len(rows) + j, args.seed) for j in range(len(batch))]
            results = render_many([(t,) + v for (t, _), v in zip(batch, voices)], args.workers)
            for (text, wrd), v, (audio, labels) in zip(batch, voices, results):
                if total >= minutes * 60 * SR:
                    break
                uid = f"{split}-{len(rows):05d}"
                rel = f"{split}/{uid}.flac"
                sf.write(os.path.join(args.out, rel), audio, SR, subtype="PCM_16",
                         format="FLAC")
                rows.append((uid, rel, len(audio), v, wrd, labels, text))
                total += len(audio)
                pos += 1
        with open(os.path.join(args.out, f"{split}.tsv"), "w") as ft, \
                open(os.path.join(args.out, f"{split}.wrd"), "w") as fw, \
                open(os.path.join(args.out, f"{split}.phn"), "w") as fp, \
                open(os.path.join(args.out, f"{split}.spk"), "w") as fs, \
                open(os.path.join(args.out, f"{split}.txt"), "w") as fx:
            for uid, rel, n, (voice, rate, pitch, prange), wrd, labels, text in rows:
                ft.write(f"{uid}\t{rel}\t{n}\t{voice}\t{rate}\t{pitch}\t{prange}\n")
                fw.write(wrd + "\n")
                fp.write(" ".join(labels) + "\n")
                fs.write(voice + "\n")
                fx.write(text + "\n")
        phone_counts[split] = Counter(p for r in rows for p in r[5])
        print(f"{split}: {len(rows)} utts, {total / SR / 60:.2f} min", file=sys.stderr)
    allp = sorted(set().union(*phone_counts.values()))
    with open(os.path.join(args.out, "phones.txt"), "w") as f:
        f.write("phone\ttrain\tvalid\ttest\n")
        for p in sorted(allp, key=lambda p: -phone_counts["train"][p]):
            f.write(p + "".join(f"\t{phone_counts[s][p]}" for s in ("train", "valid", "test"))
                    + "\n")
    with open(os.path.join(args.out, "dict.phn.txt"), "w") as f:   # fairseq Dictionary
        for p in sorted(allp, key=lambda p: -phone_counts["train"][p]):
            f.write(f"{p} {phone_counts['train'][p]}\n")
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
