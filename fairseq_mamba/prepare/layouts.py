"""Find a corpus's audio files and pair each with its transcript, in the common layouts.

* ``librispeech``: ``*.trans.txt`` files anywhere under the folder, lines ``<id> <text>``, the audio
  ``<id>.<ext>`` in the same folder (LibriSpeech, and corpora copied from its layout).
* ``list``: one file of ``<audio><sep><text>`` lines, the separator a TAB, ``|`` (LJSpeech's
  ``metadata.csv``) or ``,`` (CSV, quoted fields allowed), whichever the first line has first in
  that order. ``<audio>`` is a path relative to the audio folder, with or without its extension,
  or a bare file name (``LJ001-0001``) when that names one file. With more than two fields the
  text is the last one (LJSpeech: the normalised text), or the column named
  ``text``/``transcript``/``transcription``/``sentence`` when the first line is a header.
* ``per-file``: ``<name>.txt`` (or ``.lab``) beside each ``<name>.<ext>`` audio file.

``auto`` picks ``list`` when a list file is given, else ``librispeech`` when there is a
``*.trans.txt``, else ``per-file``. Each fault is a ``data_checks.Problem`` (file, line, fix).
"""
import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fairseq_mamba.checks.data_checks import DataError, Problem

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                    ".w64", ".rf64", ".caf", ".sph"}  # what libsndfile (soundfile) reads
LAYOUTS = ("auto", "librispeech", "list", "per-file")
HEADER_TEXT = ("text", "transcript", "transcription", "sentence")


@dataclass(frozen=True)
class Utterance:
    key: str  # the audio's path relative to the audio folder, without extension ('/'-separated)
    audio: str  # the audio file
    text: str  # the transcript as written
    source: str  # the transcript file
    line: int  # its 1-based line


def find_audio(folder: str) -> Dict[str, str]:
    """key (relative path without extension) -> audio path, for every audio file under ``folder``."""
    found: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in AUDIO_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            key = os.path.relpath(os.path.join(dirpath, stem), folder).replace(os.sep, "/")
            if key in found:
                raise DataError(f"{found[key]} and {path} are the same utterance in two files.\n  Fix: "
                                "keep one of them (both would become the same 16 kHz FLAC)")
            found[key] = path
    if not found:
        raise DataError(f"no audio files under {folder} (looked for "
                        f"{' '.join(sorted(AUDIO_EXTENSIONS))}).\n  Fix: give the folder that holds them")
    return found


def _librispeech(folder: str, audio: Dict[str, str]) -> Tuple[List[Utterance], List[Problem]]:
    utts, problems = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(f for f in filenames if f.endswith(".trans.txt")):
            path = os.path.join(dirpath, name)
            rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            for i, line in enumerate(open(path, encoding="utf-8"), start=1):
                if not line.strip():
                    continue
                uid, _, text = line.strip().partition(" ")
                key = uid if rel_dir == "." else f"{rel_dir}/{uid}"
                if key not in audio:
                    problems.append(Problem(path, i, os.path.join(dirpath, uid) + ".*",
                                            "does not exist (no audio file for this transcript line)",
                                            "add the audio file, or delete the line"))
                    continue
                utts.append(Utterance(key, audio[key], text, path, i))
    return utts, problems


def _resolve(name: str, folder: str, audio: Dict[str, str], by_stem: Dict[str, List[str]]) -> Optional[str]:
    """The key of the audio file a list names: a relative or absolute path, with or without its
    extension, or a bare file name that names exactly one file."""
    path = name if os.path.isabs(name) else os.path.join(folder, name)
    rel = os.path.relpath(path, folder).replace(os.sep, "/")
    for key in (rel, os.path.splitext(rel)[0]):
        if key in audio and (key == rel or os.path.normpath(audio[key]) == os.path.normpath(path)):
            return key
    matches = by_stem.get(os.path.splitext(os.path.basename(name))[0], [])
    return matches[0] if len(matches) == 1 and "/" not in name else None


def _rows(list_path: str):
    """(line number, fields) of a TAB, '|' or ',' separated list."""
    with open(list_path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    first = next((line for line in lines if line.strip()), "")
    sep = next((s for s in ("\t", "|", ",") if s in first), "\t")
    if sep == ",":
        for i, fields in enumerate(csv.reader(lines), start=1):
            yield i, fields
    else:
        for i, line in enumerate(lines, start=1):
            yield i, line.split(sep)


def _listed(folder: str, audio: Dict[str, str], list_path: str) -> Tuple[List[Utterance], List[Problem]]:
    if not os.path.isfile(list_path):
        raise DataError(f"transcript list {list_path} does not exist.\n  Fix: give the file of "
                        "'<audio path><TAB><text>' lines (or CSV)")
    by_stem: Dict[str, List[str]] = {}
    for key in audio:
        by_stem.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    utts, problems, column = [], [], -1
    for i, fields in _rows(list_path):
        if not any(f.strip() for f in fields):
            continue
        key = _resolve(fields[0].strip(), folder, audio, by_stem)
        if key is None and i == 1 and any(f.strip().lower() in HEADER_TEXT for f in fields):
            column = [f.strip().lower() in HEADER_TEXT for f in fields].index(True)
            continue  # a header line
        if len(fields) < 2:
            problems.append(Problem(list_path, i, fields[0], "has no transcript field",
                                    "write '<audio path><TAB><text>' (or CSV: path,text)"))
        elif key is None:
            problems.append(Problem(list_path, i, fields[0], f"names no audio file under {folder}",
                                    "give its path relative to the audio folder (with or without "
                                    "extension), or delete the line"))
        else:
            utts.append(Utterance(key, audio[key], fields[column], list_path, i))
    return utts, problems


def _per_file(audio: Dict[str, str]) -> Tuple[List[Utterance], List[Problem]]:
    utts, problems = [], []
    for key, path in audio.items():
        stem = os.path.splitext(path)[0]
        text_path = next((stem + e for e in (".txt", ".lab") if os.path.isfile(stem + e)), None)
        if text_path is None:
            problems.append(Problem(path, 1, stem + ".txt", "does not exist (no transcript for this audio)",
                                    "write the transcript there, or move the audio out of the folder"))
            continue
        with open(text_path, encoding="utf-8") as f:
            utts.append(Utterance(key, path, " ".join(f.read().split()), text_path, 1))
    return utts, problems


def read_corpus(folder: str, layout: str = "auto", list_path: Optional[str] = None):
    """-> (layout used, utterances, problems, keys of audio files no transcript names)."""
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    audio = find_audio(folder)
    if layout == "auto":
        has_trans = any(f.endswith(".trans.txt") for _, _, files in os.walk(folder) for f in files)
        layout = "list" if list_path else "librispeech" if has_trans else "per-file"
    if layout == "list" and not list_path:
        raise DataError("layout 'list' needs the list file.\n  Fix: pass --transcripts FILE")
    if layout == "librispeech":
        utts, problems = _librispeech(folder, audio)
    elif layout == "list":
        utts, problems = _listed(folder, audio, list_path)
    else:
        utts, problems = _per_file(audio)
    seen: Dict[str, Utterance] = {}
    for u in utts:
        if u.key in seen:
            first = seen[u.key]
            problems.append(Problem(u.source, u.line, u.audio, f"already has a transcript ({first.source} "
                                    f"line {first.line})", "keep one transcript per audio file"))
            continue
        seen[u.key] = u
    unnamed = sorted(set(audio) - set(seen))
    return layout, list(seen.values()), problems, unnamed
