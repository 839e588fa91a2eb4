"""Check a HuBERT data split before any work is done: manifest, audio, labels, dictionaries.

fairseq reads audio lazily inside its data loader, so a bad file surfaces hours into training as
a deep traceback, and some faults never surface: a label sequence that does not fit its audio
only logs a warning, a label missing from ``dict.*.txt`` silently becomes ``<unk>``. This module
reads everything a split needs once, up front, and turns each fault into one ``DataError``
(a ``ValueError``) that names the file, the manifest line and the fix.

Design:

* One pass per input kind, each returning ``Problem`` s (``check_audio``, ``check_labels``), then
  one policy (``settle``): by default the first problem is raised, with a count of the others;
  ``FAIRSEQ_MAMBA_BAD_LINES=skip`` instead drops every bad manifest line, counted in the log.
  Faults that are not about one line (a label file with the wrong number of lines, a missing
  dictionary, an unparsable manifest) are always errors.
* Audio: soundfile's header (exists, readable, mono, the task's rate, samples > 0 and equal to the
  manifest's count); then the samples themselves where the header cannot vouch for them: float
  files (NaN/inf) and compressed ones (a truncated FLAC keeps its full length in the header).
  PCM WAV needs no decoding: libsndfile derives its length from the file size, so a truncated
  WAV already shows up as a wrong sample count. The result is cached next to the manifest in
  ``<manifest>.checked`` (JSON), keyed by the manifest's bytes and every file's size and mtime,
  so a later stage or run only stats the files.
* Labels: as many lines as the manifest has utterances, every token in the dictionary, and for
  frame labels (``label_rate > 0``) a duration within ``LABEL_TOLERANCE_S`` = 0.1 s of the audio
  (fairseq's own tolerance, which fairseq only warns about; we raise). Size limits (min/max
  sample size, max_tokens, the conv stack's receptive field, CTC lengths): ``size_checks``.
* Hooks: ``install_training_checks`` wraps fairseq's ``HubertPretrainingTask.load_dataset`` (the
  task used by pre-training, both models, and by ``hubert_ctc`` fine-tuning): the split is
  checked before fairseq builds its dataset, skipped lines are dropped from that dataset, and
  reading a file that changed since the check raises a ``DataError`` naming it instead of a
  data-loader traceback. ``fairseq_mamba.fairseq_fixes.upstream`` checks the manifest lines of a feature-dump
  shard before fairseq's ``simple_kmeans`` script starts.
"""
import functools
import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

BAD_LINES_ENV = "FAIRSEQ_MAMBA_BAD_LINES"
LABEL_TOLERANCE_S = 0.1
# Formats whose header length is derived from the file size (a truncation shows as a short count).
_SIZE_DERIVED_FORMATS = {"WAV", "WAVEX", "W64", "RF64", "AIFF", "RAW"}
_PARALLEL_ABOVE = 500  # files; below this one process is faster than starting a pool


class DataError(ValueError):
    """Bad data: the message names the file, the manifest line and the fix."""


@dataclass(frozen=True)
class Problem:
    source: str  # the manifest (or label file) the line belongs to
    line: int  # 1-based line in ``source``
    path: str  # the file at fault
    what: str
    fix: str

    def message(self) -> str:
        return f"{self.source} line {self.line}: {self.path} {self.what}.\n  Fix: {self.fix}"


@dataclass(frozen=True)
class Entry:
    line: int  # 1-based line of the manifest
    rel: str
    samples: int


@dataclass
class Manifest:
    path: str
    root: str
    entries: List[Entry]

    def audio_path(self, entry: Entry) -> str:
        return os.path.join(self.root, entry.rel)


def read_manifest(path: str) -> Manifest:
    """fairseq's manifest: the audio root, then ``<relative path>\\t<number of samples>`` lines."""
    if not os.path.isfile(path):
        raise DataError(f"manifest {path} does not exist.\n  Fix: build it (run_scripts/01_manifests.sh "
                        "or fairseq's examples/wav2vec/wav2vec_manifest.py) or correct task.data")
    with open(path) as f:
        root = f.readline().strip()
        lines = f.read().splitlines()
    entries = []
    for i, line in enumerate(lines, start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DataError(f"{path} line {i}: {line!r} is not '<relative path><TAB><number of "
                            "samples>'.\n  Fix: correct or delete the line (the first line is the "
                            "audio root, every other line one utterance)")
        entries.append(Entry(i, fields[0], int(fields[1])))
    return Manifest(path, root, entries)


def _audio_problem(args) -> Optional[Problem]:
    """The first fault of one manifest entry, or None. ``args``: (source, path, entry, sample_rate)."""
    source, path, entry, sample_rate = args

    def problem(what, fix):
        return Problem(source, entry.line, path, what, fix)

    if not os.path.isfile(path):
        return problem("does not exist", "correct the path (relative to the manifest's first line) "
                       "or rebuild the manifest")
    try:
        info = sf.info(path)
    except Exception as err:  # libsndfile: "Format not recognised", ...
        return problem(f"cannot be read as audio ({err})", "replace the file or delete its line")
    if info.frames == 0:
        return problem("has no samples", "delete its line from the manifest")
    if info.channels != 1:
        return problem(f"has {info.channels} channels; the task reads mono audio",
                       f"convert it: sox IN -c 1 OUT (or ffmpeg -i IN -ac 1 OUT)")
    if info.samplerate != sample_rate:
        return problem(f"is {info.samplerate} Hz; the task's sample_rate is {sample_rate}",
                       f"resample it: sox IN -r {sample_rate} OUT, then rebuild the manifest "
                       "(the sample count changes)")
    if info.frames != entry.samples:
        return problem(f"has {info.frames} samples but the manifest says {entry.samples}",
                       "rebuild the manifest (a file shorter than listed may be truncated)")
    if info.format in _SIZE_DERIVED_FORMATS and info.subtype not in ("FLOAT", "DOUBLE"):
        return None  # PCM: no NaN possible, truncation already seen in the count
    read, bad, first_bad = 0, 0, None
    try:
        for block in sf.blocks(path, blocksize=1 << 16, dtype="float32"):
            finite = np.isfinite(block)
            if not finite.all():
                first_bad = read + int(np.argmin(finite)) if first_bad is None else first_bad
                bad += int((~finite).sum())
            read += len(block)
    except Exception as err:
        return problem(f"is corrupt or truncated: decoding stopped after {read} of {info.frames} "
                       f"samples ({err})", "re-copy or re-encode the file, or delete its line")
    if read != info.frames:
        return problem(f"is truncated: {read} of the {info.frames} samples in its header decode",
                       "re-copy or re-encode the file, or delete its line")
    if bad:
        return problem(f"has {bad} NaN/inf samples (the first at sample {first_bad})",
                       "re-export the audio (NaN/inf cannot be normalised), or delete its line")
    return None


def _fingerprint(manifest: Manifest, sample_rate: int) -> str:
    digest = hashlib.sha1(f"{sample_rate}\n".encode())
    with open(manifest.path, "rb") as f:
        digest.update(f.read())
    for entry in manifest.entries:
        try:
            st = os.stat(manifest.audio_path(entry))
            digest.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"missing\n")
    return digest.hexdigest()


def _cached(manifest: Manifest, fingerprint: str) -> Optional[List[Problem]]:
    try:
        with open(manifest.path + ".checked") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    if stamp.get("fingerprint") != fingerprint:
        return None
    return [Problem(**p) for p in stamp["problems"]]


def save_check(manifest: Manifest, sample_rate: int, problems: Sequence[Problem]) -> None:
    """Write ``<manifest>.checked`` (atomically); a read-only data directory is not an error."""
    stamp = {"fingerprint": _fingerprint(manifest, sample_rate),
             "problems": [p.__dict__ for p in problems]}
    tmp = f"{manifest.path}.checked.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(stamp, f)
        os.replace(tmp, manifest.path + ".checked")
    except OSError as err:
        logger.info(f"could not cache the audio check next to {manifest.path} ({err})")


def check_audio(manifest: Manifest, sample_rate: int, entries: Optional[Sequence[Entry]] = None,
                cache: bool = True) -> List[Problem]:
    """Problems of ``entries`` (default: all) of ``manifest``; uses and (for all) writes the cache."""
    whole = entries is None
    entries = manifest.entries if whole else entries
    fingerprint = _fingerprint(manifest, sample_rate) if cache and os.path.isfile(manifest.path) else None
    cached = fingerprint and _cached(manifest, fingerprint)
    if cached is not None:
        lines = {e.line for e in entries}
        return [p for p in cached if p.line in lines]
    jobs = [(manifest.path, manifest.audio_path(e), e, sample_rate) for e in entries]
    logger.info(f"checking {len(jobs)} audio files of {manifest.path}")
    workers = min(8, os.cpu_count() or 1)
    if len(jobs) > _PARALLEL_ABOVE and workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            found = pool.map(_audio_problem, jobs, chunksize=64)
    else:
        found = [_audio_problem(job) for job in jobs]
    problems = [p for p in found if p is not None]
    if whole and fingerprint:
        save_check(manifest, sample_rate, problems)
    return problems


def load_label_symbols(dict_path: str) -> Set[str]:
    """The symbols of a fairseq ``dict.*.txt`` (without fairseq's special symbols)."""
    from fairseq.data import Dictionary

    if not os.path.isfile(dict_path):
        raise DataError(f"dictionary {dict_path} does not exist.\n  Fix: write it next to the labels "
                        "(stage 04 writes dict.km.txt, stage 01 dict.ltr.txt) or correct task.label_dir")
    try:
        dictionary = Dictionary.load(dict_path)
    except Exception as err:
        raise DataError(f"dictionary {dict_path} cannot be read ({err}).\n  Fix: one "
                        "'<symbol> <count>' per line") from err
    return set(dictionary.symbols[dictionary.nspecial:])


def check_labels(manifest: Manifest, label_path: str, dict_path: str, label_rate: float,
                 sample_rate: int) -> List[Problem]:
    """Per-line label problems; DataError for a missing file, dictionary or a wrong line count."""
    symbols = load_label_symbols(dict_path)
    if not os.path.isfile(label_path):
        raise DataError(f"label file {label_path} does not exist.\n  Fix: make the labels (stage 04 "
                        "for k-means units) or correct task.label_dir / task.labels")
    problems, mismatched, rates, count = [], [], [], 0
    with open(label_path) as f:  # streamed (960 h of 50 Hz units is ~2e8 labels); lines counted
        for count, line in enumerate(f, start=1):  # the way fairseq's HubertDataset counts them
            if count > len(manifest.entries):
                continue
            entry, tokens = manifest.entries[count - 1], line.split()
            where = f"{label_path} line {count} ({entry.rel})"
            unknown = sorted(set(tokens) - symbols)
            if unknown:
                problems.append(Problem(manifest.path, entry.line, where,
                                        f"has labels not in {dict_path}: {' '.join(unknown[:5])}",
                                        "the labels and the dictionary come from different k-means "
                                        "models; remake both (stage 04)"))
            elif label_rate > 0:
                seconds = entry.samples / sample_rate
                rates.append(len(tokens) / seconds if seconds else 0.0)
                if abs(seconds - len(tokens) / label_rate) > LABEL_TOLERANCE_S:
                    mismatched.append((entry, where, seconds, len(tokens)))
    if count != len(manifest.entries):
        raise DataError(f"{label_path} has {count} lines but {manifest.path} lists "
                        f"{len(manifest.entries)} utterances.\n  Fix: the labels were made from another "
                        "manifest; remake them from this one (stages 02-04)")
    if mismatched:
        guess = float(np.median(rates))
        fix = ("the labels of this line do not belong to its audio; remake them (stages 02-04) or "
               "delete the line")
        if len(mismatched) > len(manifest.entries) / 2:
            fix = (f"most lines disagree: these labels look like {guess:.0f} Hz, not {label_rate:g} Hz; "
                   f"set model.label_rate={guess:.0f} (task.label_rate follows it)")
        for entry, where, seconds, count in mismatched:
            problems.append(Problem(manifest.path, entry.line, where,
                                    f"has {count} labels = {count / label_rate:.2f} s at {label_rate:g} Hz,"
                                    f" but its audio lasts {seconds:.2f} s (tolerance "
                                    f"{LABEL_TOLERANCE_S} s)", fix))
    return sorted(problems, key=lambda p: p.line)


def skipping() -> bool:
    mode = os.environ.get(BAD_LINES_ENV, "error")
    if mode not in ("error", "skip"):
        raise DataError(f"{BAD_LINES_ENV}={mode!r}: use 'error' (default) or 'skip'")
    return mode == "skip"


def settle(problems: Sequence[Problem], what: str) -> Set[int]:
    """Raise the first problem (default), or log and return the bad manifest lines (skip mode)."""
    if not problems:
        return set()
    bad = sorted({p.line for p in problems})
    if not skipping():
        others = "".join(f"\n  line {p.line}: {p.path} {p.what}" for p in problems[1:6])
        more = f"\n  ... {len(problems) - 6} more" if len(problems) > 6 else ""
        tail = (f"\n{len(problems) - 1} more problem(s) in {what}:{others}{more}" if len(problems) > 1
                else "")
        raise DataError(f"{problems[0].message()}{tail}\nTo skip bad lines instead (they are counted "
                        f"in the log), set {BAD_LINES_ENV}=skip.")
    logger.warning(f"{BAD_LINES_ENV}=skip: skipping {len(bad)} bad line(s) of {what}: "
                   + "; ".join(f"line {p.line}: {p.path} {p.what}" for p in problems[:20]))
    return set(bad)


def check_task_split(cfg, split: str):
    """Check what ``HubertPretrainingTask.load_dataset(split)`` reads; -> (manifest, bad lines)."""
    manifest = read_manifest(os.path.join(cfg.data, f"{split}.tsv"))
    label_dir = cfg.label_dir if cfg.label_dir is not None else cfg.data
    problems = check_audio(manifest, cfg.sample_rate)
    for label in cfg.labels:
        problems += check_labels(manifest, os.path.join(label_dir, f"{split}.{label}"),
                                 os.path.join(label_dir, f"dict.{label}.txt"), cfg.label_rate,
                                 cfg.sample_rate)
    from fairseq_mamba.checks.size_checks import task_problems  # (size_checks imports this module)
    problems += task_problems(manifest, cfg)
    return manifest, settle(sorted(problems, key=lambda p: p.line), manifest.path)


def subset(dataset, keep: Sequence[int], manifest_path: str) -> None:
    """Keep only the items ``keep`` (indices) of fairseq's HubertDataset, in place."""
    if not keep:
        raise DataError(f"every line of {manifest_path} is bad or filtered out; nothing to train on")
    dataset.manifest_lines = [dataset.manifest_lines[i] for i in keep]
    dataset.audio_names = [dataset.audio_names[i] for i in keep]
    dataset.sizes = [dataset.sizes[i] for i in keep]
    if dataset.store_labels:
        dataset.label_list = [[labels[i] for i in keep] for labels in dataset.label_list]
    else:
        dataset.label_offsets_list = [[o[i] for i in keep] for o in dataset.label_offsets_list]


def _keep_lines(dataset, cfg, manifest: Manifest, bad: Set[int]) -> None:
    """Drop the ``bad`` manifest lines from fairseq's HubertDataset, in place; remember each
    kept item's manifest line for error messages."""
    loaded = [e.line for e in manifest.entries  # the lines fairseq's load_audio kept (size filter)
              if not (cfg.min_sample_size is not None and e.samples < cfg.min_sample_size)
              and not (cfg.max_keep_size is not None and e.samples > cfg.max_keep_size)]
    assert len(loaded) == len(dataset.audio_names), "fairseq's HubertDataset changed its size filter"
    dataset.manifest_lines, dataset.manifest_path = loaded, manifest.path
    if bad:
        subset(dataset, [i for i, line in enumerate(loaded) if line not in bad], manifest.path)


def _guarded_get_audio(get_audio):
    """HubertDataset.get_audio that names the file and manifest line when reading fails."""

    @functools.wraps(get_audio)
    def wrapper(self, index):
        path = os.path.join(self.audio_root, self.audio_names[index])
        lines = getattr(self, "manifest_lines", None)
        where = (f"{getattr(self, 'manifest_path', 'the manifest')} line {lines[index]}" if lines
                 else "the manifest")
        fix = "it passed the check at start, so it changed since: restore it, or delete its line"
        try:
            wav = get_audio(self, index)
        except Exception as err:
            raise DataError(f"{where}: reading {path} failed ({err}).\n  Fix: {fix}") from err
        if not bool(np.isfinite(wav.numpy()).all()):
            raise DataError(f"{where}: {path} has NaN/inf samples.\n  Fix: {fix}")
        return wav

    wrapper._fairseq_mamba_checked = True
    return wrapper


def install_training_checks() -> None:
    """Wrap fairseq's hubert_pretraining task so every split is checked before it is loaded."""
    from fairseq.data.audio.hubert_dataset import HubertDataset
    from fairseq.tasks.hubert_pretraining import HubertPretrainingTask

    load_dataset = HubertPretrainingTask.load_dataset
    if getattr(load_dataset, "_fairseq_mamba_checked", False):
        return

    @functools.wraps(load_dataset)
    def checked_load_dataset(self, split, **kwargs):
        manifest, bad = check_task_split(self.cfg, split)
        load_dataset(self, split, **kwargs)
        _keep_lines(self.datasets[split], self.cfg, manifest, bad)

    checked_load_dataset._fairseq_mamba_checked = True
    HubertPretrainingTask.load_dataset = checked_load_dataset
    HubertDataset.get_audio = _guarded_get_audio(HubertDataset.get_audio)


def check_feature_shards(feat_dir: str, split: str, nshard: int, ranks: Sequence[int],
                         dim: Optional[int] = None) -> None:
    """Each shard's ``.npy`` and ``.len`` (simple_kmeans' feature dump) exist and agree, and all
    have one feature dimension (``dim`` if given, e.g. the k-means model's)."""
    dims = {} if dim is None else {"the k-means model": dim}
    for rank in ranks:
        base = os.path.join(feat_dir, f"{split}_{rank}_{nshard}")
        fix = f"remove {base}.* and rerun the feature dump of shard {rank}/{nshard} (stage 02 or 06)"
        try:
            feats = np.load(base + ".npy", mmap_mode="r")
            with open(base + ".len") as f:
                lengths = [int(line) for line in f]
        except (OSError, ValueError) as err:
            raise DataError(f"feature shard {base}.npy/.len cannot be read ({err}).\n  Fix: {fix}") from err
        if feats.ndim != 2 or feats.shape[0] != sum(lengths):
            raise DataError(f"{base}.npy has shape {feats.shape} but {base}.len lists {sum(lengths)} "
                            f"frames: the dump was interrupted.\n  Fix: {fix}")
        dims[f"{base}.npy"] = feats.shape[1]
    if len(set(dims.values())) > 1:
        raise DataError(f"feature dimensions differ: {dims}.\n  Fix: features and k-means model must "
                        "come from one feature extractor (and layer); remake the odd ones")
