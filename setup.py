"""fairseq_mamba: HuBERT with bidirectional Mamba layers, as a fairseq user-dir plugin.

fairseq itself is deliberately not in install_requires: two distributions provide the
``fairseq`` module (``fairseq`` for Python < 3.11, ``fairseq-fixed`` for 3.11+), and pip
would happily install a second one over a user's working copy. ``fairseq_mamba`` checks at
import time and names both when neither is present.
"""
import importlib.util
import sys

from setuptools import find_packages, setup

if importlib.util.find_spec("fairseq") is None:
    sys.stderr.write(
        "fairseq_mamba: no `fairseq` module found. Install one of\n"
        "  pip install fairseq==0.12.2                                  (Python < 3.11)\n"
        "  pip install --no-build-isolation fairseq-fixed==0.12.3.1     (Python >= 3.11)\n"
        "before using the plugin (run_scripts/setup_env.sh does this for you).\n"
    )

setup(
    name="fairseq_mamba",
    version="0.1.0",
    description="Bidirectional-Mamba HuBERT as a fairseq user-dir plugin (arXiv 2409.07273)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_mamba", "fairseq_mamba.*"]),
    # ops/csrc: the CPU kernels' sources (scan, causal conv), compiled at first use (ops/scan_kernel.py).
    package_data={"fairseq_mamba": ["config/**/*.yaml", "ops/csrc/*.cpp", "ops/csrc/*.h"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "hydra-core>=1.0.7",
        "omegaconf>=2.0.6",
        "soundfile",
        "numpy",
    ],
    extras_require={
        # The fused CUDA kernels; the pure-PyTorch path is used where they are absent.
        "cuda": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        # Everything the bundled pipeline and analysis use beyond training.
        "pipeline": ["scikit-learn", "joblib", "npy-append-array", "sentencepiece", "matplotlib"],
        # Beam-search decoding with a letter n-gram LM (stage 08): flashlight's decoder and KenLM.
        "lm": ["flashlight-text"],
        "test": ["pytest", "pytest-xdist", "hypothesis"],
    },
)
