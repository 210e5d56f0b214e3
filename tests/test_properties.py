"""Invariants that must hold for every input, checked with hypothesis.

Property tests that live beside the code they pin (not repeated here):

- ingest: the final fact state is the last event per (user, fact) whatever the order of files
  and rows: tests/test_ingest.py::test_the_state_is_the_last_event_per_fact_whatever_the_order_of_files_and_rows
- addressing (invariant 1): NumPy and torch paths agree bit for bit:
  tests/test_addressing.py::test_numpy_and_torch_paths_agree_bit_for_bit

Here: applying a delta in place and restoring it gives the tables back bit-exactly, for any
delta (any rows, any float16 bit pattern, NaN and inf included); and an empty delta, by either
serving path, is bit-identical to serving no delta at all (invariant 2), also beside another
user's delta in the same batch (invariant 4); and the serving overlay equals the compiler's
training overlay bit for bit.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_core.checkpoint import load_checkpoint
from engram_core.delta import Delta
from engram_core.memory_index import batch_overlay, served_delta
import engram_core.row_overlay as overlay_module
from engram_core.layer import Overlay
from engram_core.row_overlay import DENSE_ROW_MAP_LIMIT, READ_FORM_LIMIT, row_map_overlay
from engram_core.serving import applied, overlay_for, split_by_layer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORWARD_SETTINGS = settings(SETTINGS, max_examples=25)  # each example runs the model forward


@pytest.fixture(scope="module")
def em(tiny_dir):
    """A private copy of the tiny model: these tests write into its tables."""
    return load_checkpoint(tiny_dir)


def table_bits(em) -> dict[int, bytes]:
    return {layer: em.memory.layer(layer).table.detach().cpu().numpy().tobytes() for layer in em.config.layers}


def zero_flags(em) -> dict[int, bool]:
    return {layer: em.memory.layer(layer).table_is_zero for layer in em.config.layers}


@st.composite
def any_delta(draw, em, finite: bool = False) -> Delta:
    """Rows anywhere in the tables (a layer may get none), values of any float16 bit pattern
    (``finite``: with NaN and inf patterns mapped to finite ones instead of being filtered out)."""
    layers, row_ids = [], []
    for layer in em.config.layers:
        rows = draw(st.sets(st.integers(0, em.memory.num_rows(layer) - 1), max_size=24))
        layers += [layer] * len(rows)
        row_ids += sorted(rows)
    width = em.config.row_width
    bits = draw(st.binary(min_size=2 * width * len(row_ids), max_size=2 * width * len(row_ids)))
    values = np.frombuffer(bits, dtype="<f2").reshape(len(row_ids), width)
    if finite:  # clear the top exponent bit of NaN/inf patterns: same sign and mantissa, finite
        raw = values.view(np.uint16).copy()
        raw[~np.isfinite(values)] &= 0xBBFF
        values = raw.view("<f2")
    return Delta(np.array(layers, np.int16), np.array(row_ids, np.int64), values)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by their bits, so NaN == NaN and -0.0 != 0.0."""
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@SETTINGS
@given(data=st.data())
def test_apply_then_restore_returns_every_table_bit_exactly(em, data):
    delta = data.draw(any_delta(em))
    before, flags = table_bits(em), zero_flags(em)
    with applied(em, delta):
        for layer in em.config.layers:  # inside: only the delta's rows differ
            table = em.memory.layer(layer).table.detach()
            mine = torch.as_tensor(delta.row_ids[delta.layers == layer], dtype=torch.long)
            untouched = torch.ones(table.shape[0], dtype=torch.bool)
            untouched[mine] = False
            original = torch.frombuffer(bytearray(before[layer]), dtype=table.dtype).view(table.shape)
            assert torch.equal(as_bits(table[untouched]), as_bits(original[untouched]))
    assert table_bits(em) == before
    assert zero_flags(em) == flags


@FORWARD_SETTINGS
@given(ids=st.lists(st.integers(0, 2047), min_size=1, max_size=20), batch=st.integers(1, 3))
def test_an_empty_delta_is_bit_identical_to_no_delta_on_every_serving_path(em, ids, batch):
    vocab = em.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.tensor([[i % vocab for i in ids]] * batch, device=em.device)
    empty = Delta.empty(em.config.row_width)
    with torch.no_grad():
        base = em.model(input_ids=input_ids).logits
        with em.memory.use(overlay_for(em, [[empty]] * batch)):
            overlaid = em.model(input_ids=input_ids).logits
        with em.memory.use(batch_overlay(em, [served_delta(em, empty)] * batch)):
            served = em.model(input_ids=input_ids).logits
        with applied(em, empty):
            in_place = em.model(input_ids=input_ids).logits
    for out in (overlaid, served, in_place):
        assert torch.equal(as_bits(out), as_bits(base))


@FORWARD_SETTINGS
@given(ids=st.lists(st.integers(0, 2047), min_size=1, max_size=20), data=st.data())
def test_an_empty_delta_beside_another_users_delta_in_one_batch_still_sees_the_base(em, ids, data):
    vocab = em.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.tensor([[i % vocab for i in ids]] * 2, device=em.device)
    other = data.draw(any_delta(em, finite=True))
    empty = Delta.empty(em.config.row_width)
    with torch.no_grad():
        base = em.model(input_ids=input_ids).logits
        with em.memory.use(overlay_for(em, [[other], [empty]])):
            mixed = em.model(input_ids=input_ids).logits
        with em.memory.use(batch_overlay(em, [served_delta(em, other), served_delta(em, empty)])):
            mixed_served = em.model(input_ids=input_ids).logits
    assert torch.equal(as_bits(mixed[1]), as_bits(base[1]))
    assert torch.equal(as_bits(mixed_served[1]), as_bits(base[1]))


def reference_overlay(em, per_sequence) -> Overlay:
    """The training form (the compiler's :class:`Overlay`: owner slots and a binary search) of
    ``per_sequence``, the reference the serving form must equal bit for bit."""
    return Overlay.from_deltas(per_sequence, {layer: em.memory.num_rows(layer) for layer in em.config.layers})


@st.composite
def hitting_delta(draw, em, ids: torch.Tensor) -> Delta:
    """A delta whose rows include rows that ``ids`` address (so it changes the output) and random ones."""
    layers, row_ids = [], []
    for layer in em.config.layers:
        addressed = sorted(set(em.memory.addresser.rows(ids.numpy(), layer).ravel().tolist()))
        rows = set(draw(st.lists(st.sampled_from(addressed), max_size=12)))
        rows |= draw(st.sets(st.integers(0, em.memory.num_rows(layer) - 1), max_size=6))
        layers += [layer] * len(rows)
        row_ids += sorted(rows)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(0, 2, (len(row_ids), em.config.row_width)).astype(np.float16)
    return Delta(np.array(layers, np.int16), np.array(row_ids, np.int64), values)


@FORWARD_SETTINGS
@given(ids=st.lists(st.integers(0, 2047), min_size=2, max_size=16), data=st.data(),
       dense_limit=st.sampled_from([0, DENSE_ROW_MAP_LIMIT]), dense_add_max=st.sampled_from([0, 10**9]),
       read_limit=st.sampled_from([0, READ_FORM_LIMIT]), kernel=st.booleans())
def test_the_serving_overlay_is_bit_identical_to_the_training_overlay(em, row_kernels, ids, data, dense_limit,
                                                                       dense_add_max, read_limit, kernel):
    """Sequences with no owner, one owner, or two (a scope and a user, sharing rows), the same
    owner in two sequences; all three forms (kernel: the compiled kernel reads the table and adds
    each sequence's marked values, one owner per sequence; read: the table copy extended by the
    written rows; add: the values added to the base rows), both map layouts of the add form (one
    level, and row keys then sequences) and both ways of adding (only at hits, and everywhere with
    -0.0 where nothing was written)."""
    vocab = em.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.tensor([[i % vocab for i in ids]] * 4)
    a, b, c = (data.draw(hitting_delta(em, input_ids)) for _ in range(3))
    per_sequence = [[a], [], [a, b], [c, a]]
    parts = [[split_by_layer(d, "cpu") for d in seq] for seq in per_sequence]
    entries = {}
    for s, owners in enumerate(parts):
        for p in owners:
            for layer, (rows, values) in p.items():
                entries.setdefault(layer, []).append((s, rows, values))
    tables = {layer: em.memory.layer(layer).table for layer in em.config.layers}
    serving = row_map_overlay(4, entries, tables, dense_limit=dense_limit, read_limit=read_limit, kernel=kernel)
    with torch.no_grad(), mock.patch.object(overlay_module, "DENSE_ADD_MAX", dense_add_max), \
            mock.patch.object(overlay_module, "KERNEL_FORM", kernel):
        base = em.model(input_ids=input_ids).logits
        with em.memory.use(reference_overlay(em, per_sequence)):
            want = em.model(input_ids=input_ids).logits
        with em.memory.use(serving):
            got = em.model(input_ids=input_ids).logits
        with em.memory.use(overlay_for(em, per_sequence)):
            via_overlay_for = em.model(input_ids=input_ids).logits
    assert torch.equal(as_bits(got), as_bits(want))
    assert torch.equal(as_bits(via_overlay_for), as_bits(want))
    assert torch.equal(as_bits(got[1]), as_bits(base[1]))  # no owner: the base model
    # One owner per sequence (a server's usual batch): the map is built in NumPy on a CPU model.
    single = [[a], [], [b], [c]]
    entries = {}
    for s, owners in enumerate(single):
        for d in owners:
            for layer, (rows, values) in split_by_layer(d, "cpu").items():
                entries.setdefault(layer, []).append((s, rows, values))
    serving = row_map_overlay(4, entries, tables, dense_limit=dense_limit, read_limit=read_limit, kernel=kernel)
    with_tensors = row_map_overlay(4, {layer: [(s, torch.from_numpy(r), torch.from_numpy(v)) for s, r, v in items]
                                       for layer, items in entries.items()}, tables, dense_limit=dense_limit,
                                   read_limit=read_limit, kernel=kernel)  # the torch build (never kernel form)
    with torch.no_grad(), mock.patch.object(overlay_module, "DENSE_ADD_MAX", dense_add_max):
        with em.memory.use(reference_overlay(em, single)):
            want = em.model(input_ids=input_ids).logits
        with em.memory.use(serving):
            got = em.model(input_ids=input_ids).logits
    assert torch.equal(as_bits(got), as_bits(want))
    assert (serving is None) == (with_tensors is None) == (not entries)  # None: nothing written at all
    for layer, m in (serving.maps.items() if serving is not None else ()):
        other = with_tensors.maps[layer]
        assert type(other) is (overlay_module._ReadMap if read_limit and dense_limit else overlay_module._RowMap)
        if kernel and dense_limit:  # NumPy parts, one owner per sequence, a CPU table: the kernel form
            assert isinstance(m, overlay_module._KernelMap)
            marked = torch.zeros_like(m.index)
            for s, r, _ in entries[layer]:
                marked[s, torch.from_numpy(r)] = torch.arange(1, len(r) + 1, dtype=torch.int32)
            assert torch.equal(m.index, marked)  # each user's j-th row marked j + 1, nothing else
            continue
        assert type(m) is type(other)
        if isinstance(m, overlay_module._ReadMap):
            n = m.source.shape[0] + len(m.rows)
            assert torch.equal(m.index, other.index) and torch.equal(as_bits(m.table[:n]), as_bits(other.table[:n]))
        else:
            assert torch.equal(m.slots, other.slots) and torch.equal(as_bits(m.values), as_bits(other.values))
            assert m.stride == other.stride and (m.row_keys is None) == (other.row_keys is None)


@pytest.mark.parametrize("dense_add_max, read_limit, kernel",
                         [(0, 0, False), (10**9, 0, False), (0, READ_FORM_LIMIT, False), (0, 0, True)])
def test_rows_holding_negative_zero_are_served_unchanged_where_nothing_was_written(em, row_kernels, dense_add_max,
                                                                                    read_limit, kernel):
    """The dense add puts -0.0 where a sequence has nothing written: x + (-0.0) keeps every x,
    -0.0 included, so a trained table's -0.0 entries reach the model as they are (the read form
    reads them from its copy of the table, the kernel form copies them from the table)."""
    layer = em.config.target_layer
    ids = torch.tensor([[5, 9, 14, 3, 77, 12]] * 2)
    rows = em.memory.addresser.rows(ids.numpy(), layer)
    table = em.memory.layer(layer).table
    saved = table.detach().clone()
    other = Delta.from_unsorted([layer] * 4, rows[0, 2, :4], np.ones((4, em.config.row_width), np.float16))
    try:
        with torch.no_grad():
            table[torch.as_tensor(rows.ravel())] = -0.0
            table[0, 0] = 1.0  # non-zero, so the Engram branch runs
            em.memory.refresh_zero_flags()
            base = em.model(input_ids=ids).logits
            with mock.patch.object(overlay_module, "DENSE_ADD_MAX", dense_add_max), \
                    mock.patch.object(overlay_module, "READ_FORM_LIMIT", read_limit), \
                    mock.patch.object(overlay_module, "KERNEL_FORM", kernel), \
                    em.memory.use(overlay_for(em, [[other], []])):
                got = em.model(input_ids=ids).logits
                e = torch.nn.functional.embedding(torch.as_tensor(rows), table)
                added = em.memory._overlay.read(layer, torch.as_tensor(rows), table)
                form = em.memory._overlay.maps[layer]
                assert isinstance(form, overlay_module._KernelMap) == kernel
                assert isinstance(form, overlay_module._ReadMap) == (bool(read_limit) and not kernel)
        assert torch.equal(as_bits(got[1]), as_bits(base[1]))
        assert torch.equal(as_bits(added[1]), as_bits(e[1]))  # the -0.0 rows themselves, bit for bit
        assert torch.equal(as_bits(added[0, :2]), as_bits(e[0, :2]))  # before the written position
    finally:
        with torch.no_grad():
            table.copy_(saved)
        em.memory.refresh_zero_flags()


def test_a_reused_slot_map_holds_only_the_new_overlays_entries():
    """Host slot maps go back to a pool when their overlay is collected, cleared where it wrote;
    the next overlay of the same size gets one and must see none of the old entries."""
    import gc

    rng = np.random.default_rng(0)
    R, width, B = 500, 4, 3

    def entries(seed):
        g = np.random.default_rng(seed)
        return {7: [(b, np.sort(g.choice(R, 20, replace=False)), g.normal(size=(20, width)).astype(np.float16))
                    for b in range(B)]}

    tables = {7: torch.zeros(R, width)}
    first = row_map_overlay(B, entries(1), tables, read_limit=0, kernel=False)
    first_slots = first.maps[7].slots
    assert first.maps[7].written is not None and int((first_slots != 0).sum()) == 20 * B
    del first
    gc.collect()
    assert any(t is first_slots for t in overlay_module._ZEROED_MAPS._free)  # given back...
    assert not bool(first_slots.any())  # ...cleared
    second = row_map_overlay(B, entries(2), tables, read_limit=0, kernel=False)
    assert second.maps[7].slots is first_slots  # reused
    fresh = row_map_overlay(B, {7: [(b, torch.from_numpy(r), torch.from_numpy(v)) for b, r, v in entries(2)[7]]},
                            tables, read_limit=0, kernel=False)  # the torch build: a new zeroed map
    assert torch.equal(second.maps[7].slots, fresh.maps[7].slots)
    assert torch.equal(second.maps[7].values, fresh.maps[7].values)
    del rng


def _read_form_case(seed: int, host: bool = True):
    """A (500 x 4) table, three sequences' entries (NumPy or tensors), and addressed rows (3, 6, 2)
    that hit some of each sequence's rows."""
    g = np.random.default_rng(seed)
    R, width, B = 500, 4, 3
    table = torch.nn.Parameter(torch.from_numpy(g.normal(size=(R, width)).astype(np.float32)), requires_grad=False)
    items = [(b, np.sort(g.choice(R, 20, replace=False)), g.normal(size=(20, width)).astype(np.float16)) for b in range(B)]
    rows = torch.from_numpy(np.stack([g.choice(np.concatenate([r[:6], g.integers(0, R, 6)]), (6, 2)) for _, r, _ in items]))
    if not host:
        items = [(b, torch.from_numpy(r), torch.from_numpy(v)) for b, r, v in items]
    return table, {7: items}, rows


@pytest.mark.parametrize("host", [True, False])
def test_a_reused_read_form_reads_only_the_new_overlays_rows(host):
    """Read-form buffers (the table copy, the per-sequence index) go back to a pool when their
    overlay is collected, the index restored where it was written; the next overlay reuses them
    and reads exactly what the add form (no pooled state) reads."""
    import gc

    table, entries, rows = _read_form_case(1, host)
    first = row_map_overlay(3, entries, {7: table}, kernel=False)
    m = first.maps[7]
    assert isinstance(m, overlay_module._ReadMap)
    index, copy = m.index, m.table
    del first, m
    gc.collect()
    assert torch.equal(index, torch.arange(500, dtype=torch.int32).expand(3, 500))  # restored: every row reads itself
    _, entries, rows = _read_form_case(2, host)
    second = row_map_overlay(3, entries, {7: table}, kernel=False)
    assert second.maps[7].index is index and second.maps[7].table is copy  # reused
    want = row_map_overlay(3, entries, {7: table}, read_limit=0, kernel=False).read(7, rows, table)
    got = second.read(7, rows, table)
    assert torch.equal(as_bits(got), as_bits(want))
    assert not torch.equal(got, torch.nn.functional.embedding(rows, table))  # the case does hit written rows


def test_the_read_form_follows_its_table_when_the_table_is_written_after_the_build():
    """The read form serves a copy of the table: written in place after the build (or between
    two uses of a pooled copy), the table is copied again and the overlay reads what the add
    form reads from the table as it is now."""
    import gc

    table, entries, rows = _read_form_case(3)
    overlay = row_map_overlay(3, entries, {7: table}, kernel=False)
    with torch.no_grad():
        table[rows[0, 0]] += 1.0
    want = row_map_overlay(3, entries, {7: table}, read_limit=0, kernel=False).read(7, rows, table)
    assert torch.equal(as_bits(overlay.read(7, rows, table)), as_bits(want))
    assert overlay.maps[7].version == table._version  # rebuilt against the written table
    del overlay
    gc.collect()
    with torch.no_grad():
        table[rows[1, 0]] -= 2.0  # the pooled copy is now one write behind
    again = row_map_overlay(3, entries, {7: table}, kernel=False)
    want = row_map_overlay(3, entries, {7: table}, read_limit=0, kernel=False).read(7, rows, table)
    assert torch.equal(as_bits(again.read(7, rows, table)), as_bits(want))
    other = torch.nn.Parameter(table.detach() * 3, requires_grad=False)  # another table of the same shape
    want = row_map_overlay(3, entries, {7: other}, read_limit=0, kernel=False).read(7, rows, other)
    assert torch.equal(as_bits(again.read(7, rows, other)), as_bits(want))
