"""The seed paper's MI procedure (MINE-DV per utterance, averaged): known-MI cases and its input checks."""
import math

import pytest
import torch

from fairseq_mamba.analysis.ground_truth import gaussian_pair
from fairseq_mamba.analysis.mutual_information import estimate_mi


def utterances(n_utts, frames):
    return torch.arange(n_utts * frames) // frames


@pytest.mark.parametrize("true_mi", [0.0, 0.25, 0.75])
def test_known_mi_in_one_dimension_is_read_from_long_utterances(true_mi):
    # correlated Gaussians, 2 "utterances" of 1000 frames: little room to over-fit a 1-d pair in-sample
    g = torch.Generator().manual_seed(1)
    x, y = gaussian_pair(true_mi, 1, 2000) if true_mi else (torch.randn(2000, 1, generator=g),
                                                           torch.randn(2000, 1, generator=g))
    est = estimate_mi(x, y, method="mine_utterance", groups=utterances(2, 1000), pca=None, steps=300, lr=3e-3)
    assert est.value == pytest.approx(true_mi, abs=0.1)
    assert est.n_fit == est.n_heldout == 2000  # in-sample: every frame trains and scores


def test_the_sample_is_one_utterance_not_the_pooled_frames():
    # within each utterance x and y are independent; only the utterance means go together, so the
    # pooled frames share ~log(4) nats (the utterance identity) while every single utterance shares none
    g = torch.Generator().manual_seed(2)
    groups = utterances(4, 250)
    means = 6 * groups[:, None].float()
    x, y = means + torch.randn(1000, 1, generator=g), means + torch.randn(1000, 1, generator=g)
    per_utt = estimate_mi(x, y, method="mine_utterance", groups=groups, pca=None, steps=200, lr=3e-3)
    pooled = estimate_mi(x, y, method="infonce", hidden=16, embed=16, max_steps=200)
    assert abs(per_utt.value) < 0.1
    assert pooled.value > 0.5 * math.log(4)


def test_held_out_frames_and_the_utterance_subset():
    x, y = gaussian_pair(1.0, 1, 3000)
    est = estimate_mi(x, y, method="mine_utterance", groups=utterances(6, 500), pca=None, held_out=0.3,
                      max_utterances=3, repeats=2)
    assert est.n_fit == 3 * 500 and est.n_heldout == 3 * 150
    assert est.std > 0  # each repeat draws its own utterances and critics
    assert all(-1 < v < 2 for v in est.values)


def test_bad_inputs_are_named():
    x, y = gaussian_pair(1.0, 2, 200)
    with pytest.raises(ValueError, match="needs groups"):
        estimate_mi(x, y, method="mine_utterance")
    with pytest.raises(ValueError, match="continuous y"):
        estimate_mi(x, torch.zeros(200, dtype=torch.long), method="mine_utterance", groups=utterances(2, 100))
    with pytest.raises(ValueError, match="no utterance has >= 8 frames"):
        estimate_mi(x, y, method="mine_utterance", groups=torch.arange(200))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_steps'\]"):
        estimate_mi(x, y, method="mine_utterance", groups=utterances(2, 100), max_steps=5)
