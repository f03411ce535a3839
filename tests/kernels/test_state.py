"""Exact tests of the state rules (eidetic_kernels.state)."""
import pytest
import torch

from eidetic_kernels import FREE, PRUNED
from eidetic_kernels.state import (check_state_vector, compact_rows, expand_rows, frozen_blocks, live_inputs,
                                   live_synapses, make_table, storage_slots, view_states)
from tests.helpers import dense_mask, random_states


def test_free_is_newer_than_every_task_and_pruned_is_dead():
    in_task = torch.tensor([0, 1, 2, FREE, PRUNED], dtype=torch.int16)
    out_task = torch.tensor([0, 1, FREE, PRUNED], dtype=torch.int16)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(live_synapses(in_task, out_task), expected)


def test_min_input_task_cuts_older_inputs():
    in_task = torch.tensor([0, 1, 2, FREE], dtype=torch.int16)
    out_task = torch.tensor([1, FREE], dtype=torch.int16)
    lo = torch.tensor([1, 2], dtype=torch.int16)
    expected = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(live_synapses(in_task, out_task, lo), expected)
    assert torch.equal(live_inputs(in_task, 1, 1), expected[0])


def test_rule_matches_independent_dense_mask():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        i, o = random_states(13, g), random_states(11, g)
        lo = torch.randint(0, 2, (11,), generator=g).to(torch.int16)
        assert torch.equal(live_synapses(i, o, lo).double(), dense_mask(i, o, lo))


def test_storage_slots_group_frozen_rows_by_task():
    task = torch.tensor([FREE, 1, 0, PRUNED, 1, 0, FREE], dtype=torch.int16)
    slot = storage_slots(task)
    # trainable storage: neurons 0, 3, 6 in index order; frozen: task 0 (2, 5) then task 1 (1, 4)
    assert slot.tolist() == [0, 2, 0, 1, 3, 1, 2]


def test_storage_slots_order_frozen_rows_by_task_then_min_input_task():
    task = torch.tensor([1, 1, 0, 1, FREE], dtype=torch.int16)
    lo = torch.tensor([1, 0, 0, 0, 0], dtype=torch.int16)
    # frozen: (task 0, lo 0): 2; (task 1, lo 0): 1, 3; (task 1, lo 1): 0
    assert storage_slots(task, lo).tolist() == [3, 1, 0, 2, 0]


@pytest.mark.parametrize("seed", range(4))
def test_table_blocks_cover_every_live_neuron_once_and_read_exactly_their_live_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    out_task, in_task = random_states(17, g), random_states(9, g)
    lo = torch.randint(0, 2, (17,), generator=g).to(torch.int16)
    lo[out_task == PRUNED] = 0
    for view in (None, 0, 1):
        table = make_table(in_task, out_task, lo, view)
        seen = view_states(out_task, view)
        covered = torch.cat([b.rows for b in table.blocks]) if table.blocks else torch.zeros(0, dtype=torch.long)
        assert len(set(covered.tolist())) == covered.numel()
        live = set((seen != PRUNED).nonzero().flatten().tolist())
        assert live <= set(covered.tolist())  # trainable blocks may also cover (and zero) PRUNED rows
        for b in table.blocks:
            if b.frozen:
                assert bool((out_task[b.rows] == b.task).all()) and bool((lo[b.rows] == b.min_task).all())
                want = live_inputs(in_task, b.task, b.min_task).nonzero().flatten()
                got = torch.arange(in_task.numel()) if b.cols is None else b.cols
                assert torch.equal(got, want)
                assert view is None or b.task <= view


def test_compact_storage_round_trip_and_size():
    g = torch.Generator().manual_seed(3)
    out_task, in_task = random_states(12, g), random_states(10, g)
    lo = torch.zeros(12, dtype=torch.int16)
    w = torch.randn(12, 10, 3, generator=g)
    blocks = frozen_blocks(in_task, out_task, lo)
    flat = compact_rows(w, blocks)
    m = live_synapses(in_task, out_task, lo)
    frozen = (out_task >= 0) & (out_task != FREE)
    assert flat.numel() == int(m[frozen].sum()) * 3  # exactly the live synapses of frozen rows
    full = expand_rows(flat, in_task, out_task, lo, int(frozen.sum()), (3,))
    slot = storage_slots(out_task, lo)
    for i in frozen.nonzero().flatten().tolist():
        row = full[slot[i]]
        assert torch.equal(row[m[i]], w[i][m[i]]) and bool((row[~m[i]] == 0).all())


def test_view_states_hide_later_and_free_neurons():
    task = torch.tensor([0, 1, 2, FREE, PRUNED], dtype=torch.int16)
    assert view_states(task, 1).tolist() == [0, 1, PRUNED, PRUNED, PRUNED]
    assert view_states(task, None) is task


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 1, -2]), "outside"),
    (torch.tensor([0.0, 1.0]), "integers"),
    (torch.zeros(2, 2, dtype=torch.int16), "1-D"),
    (torch.tensor([0, 40000]), "outside"),
])
def test_bad_state_vectors_are_clear_errors(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_state_vector(bad, "out_task")


def test_state_vector_length_error_names_expected():
    with pytest.raises(ValueError, match="expected 4"):
        check_state_vector(torch.zeros(3, dtype=torch.int16), "out_task", 4)
