"""TrainBatch: per-token tensors from Samples, DP split and token-budget micro-batches (deterministic)."""

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci
from slime.training.batch import TrainBatch, collate, pad_rows, unpad_rows
from slime.types import Sample

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


def sample(i, prompt, response, mask=None, adv=1.0):
    s = Sample(tokens=list(range(1, prompt + 1)), index=i, advantage=adv, reward=float(i))
    s.append_response(list(range(100, 100 + response)), [-0.5] * response, trainable=True)
    if mask is not None:
        s.loss_mask = mask
    return s


def test_from_samples_tensors_and_collate():
    batch = TrainBatch.from_samples([sample(0, 3, 2, adv=2.0), sample(1, 2, 4, mask=[1, 0, 0, 1])], pad_token_id=0)
    assert batch.response_lengths == [2, 4]
    assert torch.equal(batch.advantages[0], torch.tensor([2.0, 2.0]))
    assert torch.equal(batch.loss_masks[1], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert batch.num_loss_tokens() == 4 and batch.num_tokens() == 11
    micro = collate(batch, [0, 1])
    assert micro.input_ids.tolist() == [[1, 2, 3, 100, 101, 0], [1, 2, 100, 101, 102, 103]]
    assert micro.response_starts == [3, 2]
    assert micro.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 1]]


def test_dp_split_and_micro_batches_are_deterministic():
    samples = [sample(i, 2 + i % 3, 1 + i % 4) for i in range(8)]
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    assert batch.split_for_dp(1, 2).sample_indices == [1, 3, 5, 7]
    lengths = [len(t) for t in batch.tokens]  # [3, 5, 7, 6, 4, 6, 5, 7]
    groups = batch.micro_batch_indices(max_tokens_per_micro_batch=14)
    assert groups == batch.micro_batch_indices(14)
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 14
    assert [i for g in groups for i in g] == list(range(8))
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert batch.micro_batch_indices(1) == [[i] for i in range(8)]  # over budget: one sample each


def test_bad_samples_are_named():
    bad = sample(7, 3, 2)
    bad.loss_mask = [1]
    with pytest.raises(ValueError, match="sample 7: loss_mask has 1 entries, response_length=2"):
        TrainBatch.from_samples([bad], 0)
    with pytest.raises(ValueError, match="cannot be split evenly over 2"):
        TrainBatch.from_samples([sample(0, 2, 1)], 0).split_for_dp(0, 2)


def test_padding_helpers_round_trip_and_rows_with_signal():
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([0.0]), torch.tensor([0.0, 0.0, -3.0])]
    padded = pad_rows(rows, 4)
    assert padded.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0], [0, 0, -3, 0]]
    back = unpad_rows(padded, [2, 1, 3])
    assert all(torch.equal(a, b) for a, b in zip(back, rows))
    assert back[0].untyped_storage().nbytes() == 8  # its own storage: pickled alone, it carries 2 floats
    batch = TrainBatch.from_samples([sample(i, 2, 3, adv=a) for i, a in enumerate([0.0, 1.5, 0.0, -1.0])], 0)
    assert batch.rows_with_nonzero("advantages") == [1, 3]
