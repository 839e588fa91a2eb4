"""Let fairseq's own checkpoint loading work under torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``, which refuses any class not on
an allow-list. fairseq 0.12 calls ``torch.load`` without the argument
(``checkpoint_utils.load_checkpoint_to_cpu``: resume, ``hubert_ctc``'s ``w2v_path``,
``dump_hubert_feature.py``), and its checkpoints hold a few such objects: the task's
``Dictionary`` objects and numpy scalars in the logged meters. Rather than turning the safety
check off, we add exactly those types to torch's allow-list when the plugin is imported.
"""
import argparse

import numpy as np
import torch


def _numpy_scalar_types():
    core = getattr(np, "_core", None) or np.core
    types = [core.multiarray.scalar, np.dtype]
    types += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return types


def fairseq_checkpoint_globals():
    """The classes a fairseq HuBERT/wav2vec2 checkpoint may contain beyond tensors and containers."""
    from fairseq.data.dictionary import Dictionary

    return [Dictionary, argparse.Namespace, *_numpy_scalar_types()]


def allow_fairseq_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        add_safe_globals(fairseq_checkpoint_globals())
