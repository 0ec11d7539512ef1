"""Micro-batches: shifted targets, completion masks, sampler log-probs, truncation."""

from __future__ import annotations

import pytest
import torch

from megagrpo.training.batch import CompletionBatch, make_micro_batches


def _batch(**kw):
    args = dict(
        prompt_ids=[[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]],
        completion_ids=[[10, 11], [12], [13, 14, 15], []],
        finish_reasons=["stop", "length", "length", "stop"],
        advantages_n=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        sampler_logprobs=[[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6], []],
    )
    args.update(kw)
    return CompletionBatch(**args)


def test_layout_by_predicting_position():
    mbs = make_micro_batches(_batch(), 2, pad_token_id=0)
    assert len(mbs) == 2
    a, b = mbs
    assert a.input_ids_bl.tolist() == [[5, 6, 7, 10, 11], [5, 6, 7, 12, 0]]  # L = 5 for both
    assert b.input_ids_bl.tolist() == [[8, 9, 13, 14, 15], [8, 9, 0, 0, 0]]
    # position t predicts token t+1: completion tokens are predicted from the last prompt token on
    assert a.mask_bl.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert a.targets_bl[0].tolist() == [6, 7, 10, 11, 0]
    assert (a.targets_bl * a.mask_bl.long())[0].tolist() == [0, 0, 10, 11, 0]
    assert b.mask_bl.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert a.sampler_logp_bl[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0])
    assert b.sampler_logp_bl[0].tolist() == pytest.approx([0, -0.4, -0.5, -0.6, 0])
    assert a.advantages_b.tolist() == [1.0, -1.0] and b.index == [2, 3]
    assert a.num_tokens == 3 and b.num_tokens == 3


def test_mask_truncated_completions_and_length_multiple():
    a, b = make_micro_batches(
        _batch(), 2, pad_token_id=0, mask_truncated_completions=True, length_multiple=4
    )
    assert a.input_ids_bl.shape == (2, 8)
    assert a.mask_bl.sum(1).tolist() == [2, 0]  # the second one hit max_tokens
    assert b.mask_bl.sum().item() == 0


def test_bad_inputs():
    with pytest.raises(
        ValueError, match="4 completions do not split into micro-batches of micro_batch_size=3"
    ):
        make_micro_batches(_batch(), 3, pad_token_id=0)
    with pytest.raises(ValueError, match="4 completions but .*advantages_n.: 3"):
        _batch(advantages_n=torch.zeros(3))
    with pytest.raises(ValueError, match="completion 1: 1 tokens but 2 log-probs"):
        _batch(sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.3], [-0.4, -0.5, -0.6], []])
