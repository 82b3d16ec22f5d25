"""benchmarks.quality_data: the probe data says where its answer is, and the training order depends on the seed only."""

import torch

from benchmarks import quality_data
from benchmarks.quality_data import lm_batches, probe_batch


def test_probe_puts_the_answer_where_it_says():
    n, run = 256, 8
    ids, labels, starts = probe_batch(torch.Generator().manual_seed(1), 32, n, run)
    values = torch.tensor(list(quality_data.PROBE_VALUES))
    for row in range(32):
        answer, start = ids[row, n - 1], int(starts[row])
        assert start + run <= n // 4 and (ids[row, start : start + run] == answer).all() and answer in values
        assert ids[row, n - 2] == quality_data.PROBE_QUESTION and labels[row, n - 1] == answer
        assert (labels[row, : n - 1] == -100).all()
        # the stored run is the only value in the context: nothing nearer gives the answer away
        assert torch.isin(ids[row, : n - 2], values).nonzero().flatten().tolist() == list(range(start, start + run))
    assert len(set(starts.tolist())) > 1 and len(set(ids[:, n - 1].tolist())) > 1


def test_data_order_depends_on_the_seed_only():
    blocks = torch.arange(40).view(10, 4)
    first = [next(lm_batches(blocks, 3, seed=0))[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], next(lm_batches(blocks, 3, seed=1))[0])
