"""Assign utterances to train / valid / test: by a seed, or by the user's own lists.

Seeded: the keys are sorted, shuffled with ``random.Random(seed)``, and test then valid take
``round(fraction * n)`` of them (at least one each), the rest is train; the same keys and seed
always give the same split, whatever order the files were found in.

Lists: a file per split, one utterance a line, named by its key (audio path relative to the audio
folder, without extension), its path with extension, or its bare file name when that is unique.
Utterances no list names are left out (counted in the log).
"""
import os
import random
from typing import Dict, List, Sequence, Tuple

from fairseq_mamba.checks.data_checks import Problem

SPLITS = ("train", "valid", "test")


def seeded_split(keys: Sequence[str], seed: int, valid: float, test: float) -> Dict[str, str]:
    """key -> split name."""
    for name, value in (("valid", valid), ("test", test)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} fraction {value}: must be in [0, 1)")
    keys = sorted(keys)
    if len(keys) < 3:
        raise ValueError(f"{len(keys)} utterance(s): train, valid and test need at least one each")
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(test * len(keys)))
    n_valid = max(1, round(valid * len(keys)))
    if n_test + n_valid >= len(keys):
        raise ValueError(f"valid {valid} and test {test} of {len(keys)} utterances leave no train")
    split = {k: "test" for k in keys[:n_test]}
    split.update({k: "valid" for k in keys[n_test:n_test + n_valid]})
    split.update({k: "train" for k in keys[n_test + n_valid:]})
    return split


def listed_split(keys: Sequence[str], lists: Dict[str, str]) -> Tuple[Dict[str, str], List[Problem]]:
    """key -> split name from ``lists`` (split name -> list file); problems name the list line."""
    by_name: Dict[str, List[str]] = {}
    for k in keys:
        by_name.setdefault(k, []).append(k)
        if "/" in k:
            by_name.setdefault(k.rsplit("/", 1)[1], []).append(k)
    split, problems = {}, []
    for name, path in lists.items():
        if not os.path.isfile(path):
            problems.append(Problem(path, 0, path, "does not exist", f"give the file listing the {name} utterances"))
            continue
        for i, line in enumerate(open(path, encoding="utf-8"), start=1):
            entry = line.strip()
            if not entry:
                continue
            stem = os.path.splitext(entry)[0] if os.path.splitext(entry)[1] else entry
            found = by_name.get(stem, [])
            if len(found) != 1:
                what = "names no prepared utterance" if not found else f"names {len(found)} utterances"
                problems.append(Problem(path, i, entry, what, "name it by its audio path relative to "
                                        "the audio folder, or delete the line"))
            elif found[0] in split and split[found[0]] != name:
                problems.append(Problem(path, i, entry, f"is also in the {split[found[0]]} list",
                                        "put each utterance in one split"))
            else:
                split[found[0]] = name
    return split, problems
