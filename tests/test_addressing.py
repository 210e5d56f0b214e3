"""Addressing is deterministic, pinned by golden vectors, and identical on the NumPy and torch paths."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.addressing import Addresser, build_canonical_ids, normalize_token_text
from engram_core.config import ConfigError, EngramConfig

GOLDEN_CONFIG = EngramConfig(layers=(2, 7), max_ngram=3, heads_per_order=2, row_width=4, slots_per_head=101, seed=42)
GOLDEN_CANONICAL = np.arange(1000) % 700
GOLDEN_IDS = [[5, 17, 999, 300, 5, 17]]
# Written once from this implementation; any change to hashing breaks every published delta.
GOLDEN_ROWS_LAYER_7 = [[[20, 217, 302, 484], [23, 167, 320, 419], [20, 136, 268, 478],
                        [95, 159, 295, 484], [112, 169, 268, 410], [23, 167, 258, 501]]]
GOLDEN_PRIMES = {2: [101, 103, 107, 109], 7: [113, 127, 131, 137]}


def golden_addresser():
    return Addresser(GOLDEN_CONFIG, GOLDEN_CANONICAL)


def test_rows_match_golden_vectors():
    rows = golden_addresser().rows(np.array(GOLDEN_IDS), 7)
    assert rows.tolist() == GOLDEN_ROWS_LAYER_7


def test_torch_path_matches_golden_vectors():
    rows = golden_addresser().rows_torch(torch.tensor(GOLDEN_IDS), 7)
    assert rows.tolist() == GOLDEN_ROWS_LAYER_7


def test_token_ids_outside_the_vocabulary_are_refused():
    a = golden_addresser()
    for ids in ([[5, 1000]], [[-1, 5]]):
        with pytest.raises(ValueError, match=r"token id out of range 0\.\.999"):
            a.rows_torch(torch.tensor(ids), 7)
        with pytest.raises(ValueError, match="does not match this Engram"):
            a.check_range(min(ids[0]), max(ids[0]))
    a.check_range(0, 999)


def test_every_head_of_every_layer_has_a_distinct_prime():
    a = golden_addresser()
    assert {layer: h.primes.tolist() for layer, h in a.layers.items()} == GOLDEN_PRIMES


def test_same_suffix_addresses_same_lower_order_rows():
    rows = golden_addresser().rows(np.array(GOLDEN_IDS), 7)[0]
    # positions 1 and 5 both end in the bigram (5, 17) but differ in their trigram
    assert rows[1, :2].tolist() == rows[5, :2].tolist()
    assert rows[1, 2:].tolist() != rows[5, 2:].tolist()


def test_left_padding_addresses_exactly_like_the_unpadded_sequence():
    a = golden_addresser()
    padded = np.array([[0, 0, 5, 17, 999]])
    valid = np.array([[False, False, True, True, True]])
    assert a.rows(padded, 2, valid)[0, 2:].tolist() == a.rows(np.array([[5, 17, 999]]), 2)[0].tolist()


def test_rows_stay_inside_each_heads_sub_table():
    a = golden_addresser()
    rows = a.rows(np.random.default_rng(0).integers(0, 1000, (4, 50)), 2)
    h = a.layers[2]
    assert np.all(rows >= h.offsets) and np.all(rows < h.offsets + h.primes)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.lists(st.integers(0, 999), min_size=6, max_size=6), min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_numpy_and_torch_paths_agree_bit_for_bit(ids, seed):
    config = EngramConfig(layers=(1,), heads_per_order=3, slots_per_head=997, seed=seed, max_ngram=4)
    a = Addresser(config, GOLDEN_CANONICAL)
    arr = np.array(ids)
    assert np.array_equal(a.rows(arr, 1), a.rows_torch(torch.tensor(arr), 1).numpy())


def test_token_text_normalisation_collapses_case_accents_and_spaces():
    assert normalize_token_text("Apple") == normalize_token_text(" apple") == "apple"
    assert normalize_token_text("Café") == "cafe"
    assert normalize_token_text("\u00a0\t ") == " "


def test_canonical_map_merges_tokens_with_equal_normalised_text(tiny):
    canonical = build_canonical_ids(tiny.tokenizer)
    ids = [tiny.tokenizer.convert_tokens_to_ids(t) for t in ("My", "Ġmy")]
    assert all(i is not None and i != tiny.tokenizer.unk_token_id for i in ids)
    assert canonical[ids[0]] == canonical[ids[1]]
    pad, eos = tiny.tokenizer.pad_token_id, tiny.tokenizer.eos_token_id
    assert canonical[pad] != canonical[eos]


def test_config_round_trips_through_json(tmp_path):
    GOLDEN_CONFIG.save(tmp_path / "c.json")
    assert EngramConfig.load(tmp_path / "c.json") == GOLDEN_CONFIG


@pytest.mark.parametrize("raw, field", [
    ({"layers": []}, "layers"),
    ({"layers": [1], "write_layer": 3}, "write_layer"),
    ({"row_width": 0}, "row_width"),
    ({"heads_per_order": "8"}, "heads_per_order"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field):
        EngramConfig.from_dict(raw)
