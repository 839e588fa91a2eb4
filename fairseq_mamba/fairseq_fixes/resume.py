"""A run killed at any point resumes from ``checkpoint_last.pt`` as if it had never stopped.

fairseq reseeds torch before every update (``Trainer._set_seed``: seed + number of updates), so
dropout after a resume repeats the uninterrupted run. Two random draws of HuBERT training escape
that seed, and one write can leave a broken checkpoint; ``install_resume_fixes`` (called on
``import fairseq_mamba``) fixes the three, without copying fairseq code:

1. **Masks.** ``HubertModel.apply_mask`` calls ``compute_mask_indices`` without a seed, and
   fairseq 0.12.3's version then draws every span from ``np.random.default_rng(None)``: fresh OS
   entropy, so no two runs mask alike, resumed or not. (In fairseq 0.12.2 it is numpy's global
   RNG, seeded once at start, so a resumed run replays the masks of updates 1, 2, ... instead.)
   We give the call a seed drawn from torch's generator, which fairseq has just reseeded for this
   update: masks become a function of (seed, update, micro-batch).
2. **Random crops.** ``HubertDataset.crop_to_max_size`` draws from numpy's global RNG, seeded once
   at start, in whatever thread collates (fairseq's prefetch thread or a loader worker), so a
   resumed run crops differently. We seed each batch's crops from (``common.seed``, epoch, the
   batch's sample ids), a per-batch ``np.random.Generator`` held in a thread-local.
   ``common.seed`` is read as ``torch.initial_seed()`` when the dataset is loaded, right after
   fairseq's ``set_torch_seed(common.seed)`` and before any update reseeds torch.
3. **Checkpoint copies.** fairseq writes the first checkpoint file of a save atomically (to
   ``.tmp``, then rename) but *copies* it to the others (``checkpoint_last.pt``, ...) with
   ``shutil.copyfile``, which truncates the target first: a kill during that copy leaves a broken
   ``checkpoint_last.pt`` and the next start fails to load it. ``fairseq.checkpoint_utils`` gets a
   ``PathManager`` whose ``copy`` writes ``<target>.tmp`` and renames it over the target, so
   ``checkpoint_last.pt`` is always the previous or the new complete checkpoint.
"""
import functools
import os
import shutil
import threading

import numpy as np
import torch

_crop_rng = threading.local()  # .rng: the current batch's crop generator, in the collating thread


def _seeded_compute_mask_indices(compute_mask_indices):
    @functools.wraps(compute_mask_indices)
    def wrapper(shape, *args, seed=None, epoch=None, indices=None, **kwargs):
        if seed is None:  # fairseq would draw from OS entropy: tie the masks to torch's seed
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            epoch, indices = 0, np.arange(shape[0])
        return compute_mask_indices(shape, *args, seed=seed, epoch=epoch, indices=indices, **kwargs)

    wrapper._fairseq_mamba_seeded = True
    return wrapper


def _seeded_collater(collater):
    @functools.wraps(collater)
    def wrapper(self, samples):
        ids = [int(s["id"]) for s in samples]
        _crop_rng.rng = np.random.default_rng([getattr(self, "crop_seed", 0), self.epoch, *ids])
        try:
            return collater(self, samples)
        finally:
            _crop_rng.rng = None

    return wrapper


def _seeded_crop(crop_to_max_size):
    @functools.wraps(crop_to_max_size)
    def wrapper(self, wav, target_size):
        rng = getattr(_crop_rng, "rng", None)
        diff = len(wav) - target_size
        if rng is None or not self.random_crop or diff <= 0:
            return crop_to_max_size(self, wav, target_size)
        start = int(rng.integers(0, diff + 1))  # fairseq: np.random.randint(0, diff + 1)
        return wav[start:start + target_size], start

    return wrapper


def _set_epoch(self, epoch):
    self.epoch = epoch


def _seeding_load_dataset(load_dataset):
    @functools.wraps(load_dataset)
    def wrapper(self, split, **kwargs):
        load_dataset(self, split, **kwargs)
        self.datasets[split].crop_seed = torch.initial_seed()

    return wrapper


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """Copy to ``dst_path + '.tmp'``, then rename: ``dst_path`` is never half written."""
    if os.path.exists(dst_path) and not overwrite:
        return False
    tmp = dst_path + ".tmp"
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return True


def install_resume_fixes() -> None:
    from fairseq import checkpoint_utils
    from fairseq.data.audio.hubert_dataset import HubertDataset
    from fairseq.file_io import PathManager
    from fairseq.models.hubert import hubert
    from fairseq.tasks.hubert_pretraining import HubertPretrainingTask

    if getattr(hubert.compute_mask_indices, "_fairseq_mamba_seeded", False):
        return
    hubert.compute_mask_indices = _seeded_compute_mask_indices(hubert.compute_mask_indices)
    HubertDataset.epoch = 1  # fairseq's EpochBatchIterator calls set_epoch before each epoch
    HubertDataset.set_epoch = _set_epoch
    HubertDataset.collater = _seeded_collater(HubertDataset.collater)
    HubertDataset.crop_to_max_size = _seeded_crop(HubertDataset.crop_to_max_size)
    HubertPretrainingTask.load_dataset = _seeding_load_dataset(HubertPretrainingTask.load_dataset)

    class AtomicCopyPathManager(PathManager):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if PathManager.path_requires_pathmanager(dst_path):  # remote storage: iopath's copy
                return PathManager.copy(src_path, dst_path, overwrite)
            return atomic_copy(src_path, dst_path, overwrite)

    checkpoint_utils.PathManager = AtomicCopyPathManager
