"""Sampling functions: crops, token-budget batches, the <eos> stream, and the epoch plan over shards."""
from __future__ import annotations

import numpy as np
import pytest

from protein_performer.data import budget_batches, plan_epoch, single_examples
from protein_performer.data.sampling import count_budget_batches, example_token_counts, join_with_eos


@pytest.fixture(scope="module")
def lengths(sample_records) -> np.ndarray:
    return np.array([len(r.sequence) for r in sample_records])


@pytest.mark.parametrize("max_length", [64, 512, 1024])
def test_windows_cover_every_residue_exactly_once(lengths, max_length):
    examples = single_examples(lengths, max_length, "windows")
    covered = np.zeros(lengths.sum(), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    for record, start, take in zip(examples.record, examples.start, examples.take):
        assert 1 <= take <= max_length - 2 and start + take <= lengths[record]
        covered[starts[record] + start:starts[record] + start + take] += 1
    assert (covered == 1).all()


def test_start_and_random_crops_give_one_example_per_protein_within_bounds(lengths):
    room = 510
    start = single_examples(lengths, 512, "start")
    assert (start.start == 0).all() and (start.take == np.minimum(lengths, room)).all()
    first = single_examples(lengths, 512, "random", np.random.default_rng(0))
    again = single_examples(lengths, 512, "random", np.random.default_rng(0))
    other = single_examples(lengths, 512, "random", np.random.default_rng(1))
    assert (first.take == start.take).all() and (first.start + first.take <= lengths).all()
    np.testing.assert_array_equal(first.start, again.start)
    long = lengths > room
    assert (first.start[~long] == 0).all() and (first.start[long] != other.start[long]).any()
    # Random crops start anywhere: over many draws both ends of a long protein are reached.
    longest = int(np.argmax(lengths))
    draws = [single_examples(lengths[longest:longest + 1], 512, "random", np.random.default_rng(s)).start[0]
             for s in range(300)]
    assert min(draws) < 0.1 * (lengths[longest] - room) and max(draws) > 0.9 * (lengths[longest] - room)


@pytest.mark.parametrize("budget", [1024, 4096, 16384])
def test_budget_batches_hold_every_example_once_within_the_budget(lengths, budget):
    counts = example_token_counts(lengths, 1024, "windows")
    batches = budget_batches(counts, budget)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(counts)))
    assert all(len(b) * counts[b].max() <= budget for b in batches)
    assert len(batches) == count_budget_batches(counts, budget)
    # Sorting by length keeps padding small: < 10% of the padded tokens on real lengths.
    padded = sum(len(b) * counts[b].max() for b in batches)
    assert counts.sum() / padded > 0.9


def test_an_example_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="exceeds tokens_per_batch"):
        budget_batches(np.array([10, 600]), 512)


def test_examples_of_several_rows_count_every_row_and_oversize_ones_can_go_alone(lengths):
    """Rows per example (an embedded protein cut into windows): a batch of r rows of width w holds r * w
    <= budget tokens; with oversize="alone" an example over the budget is a batch of its own."""
    counts = np.minimum(lengths, 300) + 2
    rows = np.where(lengths > 300, -(-lengths // 150), 1)
    batches = budget_batches(counts, 4096, rows, oversize="alone")
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(counts)))
    for batch in batches:
        assert rows[batch].sum() * counts[batch].max() <= 4096 or len(batch) == 1
    # Without rows, every example is one row: the same batches as before.
    plain = budget_batches(counts, 4096)
    ones = budget_batches(counts, 4096, np.ones(len(counts), dtype=np.int64))
    assert [b.tolist() for b in plain] == [b.tolist() for b in ones]
    with pytest.raises(ValueError, match="exceeds tokens_per_batch"):
        budget_batches(counts, 4096, rows)
    alone = budget_batches(np.array([600, 10, 10]), 512, oversize="alone")
    assert [b.tolist() for b in alone] == [[0], [1, 2]]


def test_join_with_eos(sample_records, alphabet):
    sequences = [alphabet.encode(r.sequence) for r in sample_records[:4]]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    stream = join_with_eos(np.concatenate(sequences), offsets, alphabet.eos_idx)
    expected = np.concatenate([np.append(s, alphabet.eos_idx) for s in sequences])
    np.testing.assert_array_equal(stream, expected)


@pytest.mark.parametrize("world_size, workers", [(1, 1), (1, 3), (2, 2), (4, 1)])
def test_plan_deals_every_block_to_one_shard_and_balances_batches(world_size, workers):
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 9, size=103)
    order = rng.permutation(103)
    for equal_ranks in (False, True):
        plan = plan_epoch(costs, order, world_size, workers, equal_ranks)
        dealt = np.concatenate(plan.shard_blocks)
        assert sorted(dealt.tolist()) == list(range(103))  # disjoint, and together everything
        loads = np.array([costs[b].sum() for b in plan.shard_blocks])
        assert loads.max() - loads.min() <= costs.max()
        assert (plan.quota.reshape(-1) <= loads).all()
        totals = plan.quota.sum(axis=1)
        if equal_ranks:
            assert (totals == totals.min()).all()
            assert costs.sum() - totals.sum() <= world_size * costs.max()  # little is cut
        else:
            assert totals.sum() == costs.sum()
        for shard, blocks in enumerate(plan.shard_blocks):  # each shard reads its blocks in dealing order
            assert np.all(np.diff([int(np.flatnonzero(order == b)[0]) for b in blocks]) > 0), shard
