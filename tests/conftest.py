"""Shared fixtures: small models and a tiny generated HuBERT-style dataset."""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every machine and run (derived from each test's name),
# so CI and a developer see the same cases; HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))
BIN = Path(sys.executable).parent


def write_tiny_dataset(root: Path, n_train=6, n_valid=2, n_units=7, seed=0, min_len=12000, max_len=24000):
    """Chirps plus noise, 16 kHz, with 100 Hz frame labels that follow the pitch contour.

    Writes fairseq manifests ``{split}.tsv``, labels ``{split}.km`` and ``dict.km.txt``.
    """
    rng = np.random.default_rng(seed)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        tsv, km = [str(root)], []
        for i in range(n):
            length = int(rng.integers(min_len, max_len))
            t = np.arange(length) / 16000
            f0 = rng.uniform(120, 300) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
            wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.02 * rng.standard_normal(length)
            rel = f"wav/{split}{i}.wav"
            sf.write(root / rel, wav.astype(np.float32), 16000)
            tsv.append(f"{rel}\t{length}")
            frames = f0[::160][: length // 160]
            km.append(" ".join(str(int(u)) for u in np.digitize(frames, np.linspace(120, 390, n_units - 1))))
        (root / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (root / f"{split}.km").write_text("\n".join(km) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(n_units)))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # this checkout's package, whichever tree the environment's editable install points at
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def load_run_script(name):
    """run_scripts/<name>.py as a module (run_scripts is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "run_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
