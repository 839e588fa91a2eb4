"""Prepare a folder of recordings with transcripts as a corpus stage 01 reads.

    python -m fairseq_mamba.prepare AUDIO_DIR OUT_DIR [--transcripts LIST] [--layout L]
        [--seed 0 --valid 0.05 --test 0.05 | --train-list F --valid-list F --test-list F] [--jobs N]

(``run_scripts/00_prepare.sh`` runs it.) Writes into OUT_DIR:

* ``audio/<key>.flac``: 16 kHz mono 16-bit FLAC (``prepare.audio``), ``<key>`` the source's path
  relative to AUDIO_DIR without extension;
* ``{train,valid,test}.tsv``: ``<key><TAB>audio/<key>.flac<TAB><samples><TAB><source rate><TAB>
  <source channels>`` (stage 01 reads the first three columns);
* ``{split}.wrd``: the normalised transcript (``prepare.text``), ``{split}.txt`` the original;
* ``prepare.log``: what was changed, counted (numbers spelled, brackets dropped, ...).

Every transcript is read and normalised and every audio header read before any audio is
converted: a fault stops it with one ``DataError`` naming the file, the line and the fix
(``FAIRSEQ_MAMBA_BAD_LINES=skip`` leaves those utterances out, counted). Resumable: FLACs are
written atomically and an interrupted run picks up where it stopped; OUT_DIR is only written
when it is empty, or was started by this command with the same inputs and settings
(``.prepare_plan``), and a finished one (``.done``) is left as it is.
"""
import argparse
import collections
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from typing import Dict, List

import soundfile as sf
from tqdm import tqdm

from fairseq_mamba.checks.data_checks import BAD_LINES_ENV, DataError, Problem, settle
from fairseq_mamba.prepare import audio, layouts, split as splitting, text

logger = logging.getLogger("fairseq_mamba.prepare")


def _normalised(utts: List[layouts.Utterance]):
    """-> ({key: words}, counts, problems)."""
    words, counts, problems = {}, collections.Counter(), []
    for u in utts:
        try:
            words[u.key], changed = text.normalise(u.text)
        except ValueError as err:
            problems.append(Problem(u.source, u.line, u.audio, f"transcript: {err}",
                                    "spell it in words in the transcript, or delete the line"))
            continue
        counts.update(changed)
        if not words[u.key]:
            problems.append(Problem(u.source, u.line, u.audio, f"has an empty transcript after "
                                    f"normalising {u.text!r}", "CTC needs at least one letter: write "
                                    "what is said, or delete the line"))
    return words, counts, problems


def _header_problems(utts: List[layouts.Utterance]) -> List[Problem]:
    problems = []
    for u in utts:
        try:
            info = sf.info(u.audio)
        except Exception as err:
            problems.append(Problem(u.source, u.line, u.audio, f"cannot be read as audio ({err})",
                                    "replace the file or delete its transcript line"))
            continue
        if info.frames == 0:
            problems.append(Problem(u.source, u.line, u.audio, "has no samples", "delete its transcript line"))
    return problems


def _plan_stamp(args, utts, words, assign) -> str:
    digest = hashlib.sha1(json.dumps({k: getattr(args, k) for k in ("valid", "test", "seed")}).encode())
    for u in sorted(utts, key=lambda u: u.key):
        st = os.stat(u.audio)
        digest.update(f"{u.key}\t{u.audio}\t{st.st_size}\t{st.st_mtime_ns}\t{words[u.key]}\t"
                      f"{assign[u.key]}\n".encode())
    return digest.hexdigest()


def _claim(out: str, stamp: str) -> bool:
    """True to do the work; False when ``out`` is already this preparation, finished."""
    fix = "  Fix: give another output folder, or delete it to prepare it again"
    done, plan = os.path.join(out, ".done"), os.path.join(out, ".prepare_plan")
    for marker in (done, plan):
        if os.path.isfile(marker):
            with open(marker) as f:
                if f.read().strip() != stamp:
                    raise DataError(f"{out} was prepared from other audio, transcripts or settings "
                                    f"({os.path.basename(marker)} differs); nothing is overwritten.\n{fix}")
            if marker == done:
                return False
            logger.info(f"resuming the preparation in {out}")
            return True
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out} is not empty and was not made by this command; nothing is overwritten.\n{fix}")
    os.makedirs(out, exist_ok=True)
    with open(plan, "w") as f:
        f.write(stamp + "\n")
    return True


def _convert(job):
    src, dst = job
    try:
        return audio.converted_before(src, dst) or audio.convert(src, dst)
    except ValueError as err:
        return err


def _convert_all(utts, out: str, jobs: int) -> Dict[str, object]:
    work = [(u.audio, os.path.join(out, "audio", u.key + ".flac")) for u in utts]
    if jobs > 1 and len(work) > jobs and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = list(tqdm(pool.imap(_convert, work, chunksize=4), total=len(work), desc="16 kHz FLAC"))
    else:
        results = [_convert(job) for job in tqdm(work, desc="16 kHz FLAC")]
    return {u.key: r for u, r in zip(utts, results)}


def _write_split(out: str, name: str, utts, words, results) -> None:
    rows = [(u, results[u.key]) for u in utts]
    files = {"tsv": [f"{u.key}\taudio/{u.key}.flac\t{r.samples}\t{r.source_rate}\t{r.channels}" for u, r in rows],
             "wrd": [words[u.key] for u, _ in rows], "txt": [" ".join(u.text.split()) for u, _ in rows]}
    for ext, lines in files.items():
        path = os.path.join(out, f"{name}.{ext}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(path + ".tmp", path)


def _summary(head, utts, assign, words, results, counts, left) -> str:
    lines = [head]
    for name in splitting.SPLITS:
        seconds = [results[u.key].samples / audio.RATE for u in utts if assign[u.key] == name]
        lines.append(f"{name}: {len(seconds)} utterances, {sum(seconds) / 3600:.3f} h, "
                     f"{min(seconds):.2f}-{max(seconds):.2f} s")
    seen = set("".join(words[u.key] for u in utts if assign[u.key] == "train"))
    for name in ("valid", "test"):
        unseen = sorted(set("".join(words[u.key] for u in utts if assign[u.key] == name)) - seen - {" "})
        if unseen:
            lines.append(f"warning: {name} has letters train lacks: {' '.join(unseen)} (stage 01 makes "
                         f"dict.ltr.txt from train, and fine-tuning refuses labels outside it): move such "
                         "utterances to train (--train-list) or try another --seed")
    done = [results[u.key] for u in utts]
    rates = collections.Counter(r.source_rate for r in done)
    lines.append("source rates: " + ", ".join(f"{r} Hz x{n}" for r, n in sorted(rates.items()))
                 + f"; stereo or more: {sum(r.channels > 1 for r in done)}; files with clipped samples "
                 f"after resampling: {sum(r.clipped > 0 for r in done)}")
    lines.append("transcripts: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "unchanged")
                 + f"; {left}")
    return "\n".join(lines) + "\n"


def prepare(args) -> str:
    """Do it; -> a summary (also in OUT/prepare.log)."""
    folder, out = os.path.abspath(args.audio_dir), os.path.abspath(args.out_dir)
    if out == folder or out.startswith(folder + os.sep):
        raise DataError(f"the output folder {out} is inside the audio folder {folder}.\n  Fix: write it "
                        "elsewhere (a second run would take the converted files for recordings)")
    layout, utts, problems, unnamed = layouts.read_corpus(folder, args.layout, args.transcripts)
    words, counts, text_problems = _normalised(utts)
    problems += text_problems + _header_problems(utts)
    lists = {n: getattr(args, f"{n}_list") for n in splitting.SPLITS if getattr(args, f"{n}_list")}
    settle(problems, f"the transcripts of {folder}")
    bad = {p.path for p in problems}
    utts = [u for u in utts if u.audio not in bad]
    if lists:
        if set(lists) != set(splitting.SPLITS):
            raise DataError("give all three of --train-list, --valid-list and --test-list, or none")
        assign, list_problems = splitting.listed_split([u.key for u in utts], lists)
        settle(list_problems, "the split lists")
    else:
        try:
            assign = splitting.seeded_split([u.key for u in utts], args.seed, args.valid, args.test)
        except ValueError as err:
            raise DataError(f"{folder}: {err}.\n  Fix: add recordings, or change --valid/--test") from err
    left_out = len(utts) - len(assign)
    utts = [u for u in utts if u.key in assign]
    stamp = _plan_stamp(args, utts, words, assign)
    if not _claim(out, stamp):
        with open(os.path.join(out, "prepare.log")) as f:
            return f"{out} is already prepared from these inputs: nothing to do\n" + f.read()
    results = _convert_all(utts, out, args.jobs)
    failed = [Problem(u.source, u.line, u.audio, str(results[u.key]), "replace the file or delete its "
                      "transcript line") for u in utts if isinstance(results[u.key], ValueError)]
    settle(failed, f"the audio of {folder}")
    utts = [u for u in utts if not isinstance(results[u.key], ValueError)]
    for name in splitting.SPLITS:
        part = [u for u in utts if assign[u.key] == name]
        if not part:
            raise DataError(f"the {name} split is empty (after leaving out bad lines).\n  Fix: add "
                            f"recordings, or change --valid/--test or the lists")
        _write_split(out, name, part, words, results)
    left = (f"left out: {len(bad)} bad ({BAD_LINES_ENV}=skip) + {len(failed)} unreadable, {left_out} in no "
            f"split list, {len(unnamed)} audio file(s) without a transcript" + (f" (e.g. {unnamed[0]})" if unnamed else ""))
    summary = _summary(f"layout {layout}: {len(utts)} utterances from {folder}", utts, assign, words, results,
                       counts, left)
    with open(os.path.join(out, "prepare.log"), "w") as f:
        f.write(summary)
    with open(os.path.join(out, ".done"), "w") as f:
        f.write(stamp + "\n")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_mamba.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("audio_dir", help="folder of recordings (any format and rate soundfile reads)")
    p.add_argument("out_dir", help="corpus folder to write (empty or new); stage 01 reads it")
    p.add_argument("--transcripts", help="list file: '<audio><TAB><text>', '<audio>|<text>' or CSV")
    p.add_argument("--layout", default="auto", choices=layouts.LAYOUTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid", type=float, default=0.05, help="fraction for valid (at least 1)")
    p.add_argument("--test", type=float, default=0.05, help="fraction for test (at least 1)")
    for name in splitting.SPLITS:
        p.add_argument(f"--{name}-list", help=f"file naming the {name} utterances (instead of the seed)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    return p


def main(argv=None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr, force=True)
    args = parser().parse_args(argv)
    try:
        print(prepare(args), end="")
    except DataError as err:  # the message is the whole story: no traceback
        raise SystemExit(f"{type(err).__name__}: {err}") from None
