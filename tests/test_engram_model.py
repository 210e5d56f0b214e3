"""Engram attached to Hugging Face causal LMs: empty memory is the base model, bit for bit."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engram_core.checkpoint import CheckpointError, fingerprint, load_checkpoint
from engram_core.config import ConfigError, EngramConfig
from engram_core.delta import Delta
from engram_core.hf_compat import cache_kwargs, output_cache
from engram_core.layer import Overlay, backbone_and_layers
from engram_core.serving import applied
from engram_core.tiny import build_base_model, build_tokenizer, init_tiny
from engram_core.checkpoint import attach_new_memory

FAMILIES = ["llama", "qwen2", "gpt2"]


def random_ids(vocab: int, shape=(3, 17), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_memory_is_bit_identical_to_the_base_model(family, tiny_checkpoints):
    root = tiny_checkpoints(family)
    base = AutoModelForCausalLM.from_pretrained(root / "base", local_files_only=True).eval()
    em = load_checkpoint(root, with_adapter=False)
    ids = random_ids(base.config.vocab_size)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = em.model(input_ids=ids).logits
        # Also through the full Engram math: an overlay that matches no addressed row adds exact zeros.
        miss = Overlay(torch.zeros(3, 1, dtype=torch.long), {em.config.target_layer: torch.tensor([10**9])},
                       {em.config.target_layer: torch.ones(1, em.config.row_width)})
        with em.memory.use(miss):
            through_math = em.model(input_ids=ids).logits
    assert torch.equal(want, got)
    assert torch.equal(want, through_math)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_written_row_changes_the_output_at_its_position(family, tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints(family))
    ids = random_ids(len(em.tokenizer), (1, 8))
    layer = em.config.target_layer
    rows = em.memory.addresser.rows(ids.numpy(), layer)[0, 5]
    delta = Delta.from_unsorted([layer] * len(rows), rows, torch.randn(len(rows), em.config.row_width).numpy())
    with torch.no_grad():
        before = em.model(input_ids=ids).logits
        with applied(em, delta):
            after = em.model(input_ids=ids).logits
        restored = em.model(input_ids=ids).logits
    assert torch.equal(before[0, :5], after[0, :5])
    assert not torch.equal(before[0, 5], after[0, 5])
    assert torch.equal(before, restored)


def test_apply_then_restore_returns_the_table_bit_exactly(tiny):
    layer = tiny.config.target_layer
    table = tiny.memory.layer(layer).table
    snapshot = table.detach().clone()
    delta = Delta.from_unsorted([layer] * 3, [5, 70, 900], torch.randn(3, tiny.config.row_width).numpy())
    with applied(tiny, delta):
        assert not torch.equal(table, snapshot)
    assert torch.equal(table, snapshot)
    assert tiny.memory.layer(layer).table_is_zero


def test_generate_continues_addressing_across_the_kv_cache(tiny):
    from engram_core.serving import greedy_tokens

    prompt = "My dentist is"
    ids = torch.tensor([tiny.encode_prompt(prompt)])
    tokens = greedy_tokens(tiny, prompt, 4)
    # The same tokens without a cache (full recompute each step) must come out.
    seq = ids
    for _ in range(4):
        with torch.no_grad():
            nxt = tiny.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert seq[0, ids.shape[1]:].tolist() == tokens


def test_the_shared_adapter_is_loaded_and_active(tiny_dir):
    with_adapter = load_checkpoint(tiny_dir)
    without = load_checkpoint(tiny_dir, with_adapter=False)
    ids = random_ids(len(with_adapter.tokenizer), (1, 6))
    with torch.no_grad():
        assert not torch.equal(with_adapter.model(input_ids=ids).logits, without.model(input_ids=ids).logits)
    assert not any(p.requires_grad for p in with_adapter.model.parameters())


def test_fingerprint_changes_with_any_ingredient(tmp_path):
    a = init_tiny(tmp_path / "a")
    b = init_tiny(tmp_path / "b", engram=EngramConfig(layers=(1, 3), slots_per_head=1013))
    c = init_tiny(tmp_path / "c", adapter=False)
    assert a == init_tiny(tmp_path / "a2")  # deterministic
    assert len({a, b, c}) == 3
    assert fingerprint(tmp_path / "a") == a


def test_config_that_does_not_fit_the_model_is_refused():
    tokenizer = build_tokenizer()
    model = build_base_model("llama", len(tokenizer), layers=4)
    with pytest.raises(ConfigError, match=r"layers \[7\] out of range"):
        attach_new_memory(model, tokenizer, EngramConfig(layers=(1, 7), slots_per_head=101))


def test_loading_an_incomplete_checkpoint_names_the_missing_part(tmp_path):
    (tmp_path / "base").mkdir()
    with pytest.raises(CheckpointError, match="missing tokenizer/"):
        load_checkpoint(tmp_path)


def test_many_workers_loading_one_checkpoint_at_once_share_the_token_map_cache(tmp_path):
    import threading

    from engram_core.addressing import build_canonical_ids, load_or_build_canonical_ids

    tokenizer = build_tokenizer()
    want = build_canonical_ids(tokenizer)
    start, results, errors = threading.Barrier(8), [], []

    def load() -> None:
        start.wait()
        try:
            results.append(load_or_build_canonical_ids(tokenizer, tmp_path))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8 and all((r == want).all() for r in results)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 1 and names[0].startswith("canonical-")  # one cache, no temporary files left


def test_continuing_a_kv_cache_the_model_did_not_build_is_refused(tiny):
    ids = random_ids(len(tiny.tokenizer), (2, 6))
    with torch.no_grad():
        cache = output_cache(tiny.model(input_ids=ids, use_cache=True))
        tiny.model(input_ids=ids[:1], use_cache=True)  # another call, another batch: history replaced
        with pytest.raises(ValueError, match="did not just build"):
            tiny.model(input_ids=ids[:, :1], use_cache=True, **cache_kwargs(tiny.model, cache))


def test_a_kv_cache_is_followed_under_either_name_transformers_gives_it(tiny):
    """transformers up to 5.23 passes the backbone its KV cache as ``past_key_values``, 5.24 on
    as ``cache``: the Engram hook joins the cached tokens to the new ones under either name (a
    decode step addresses rows by the N-grams that end at it), and ``cache_kwargs`` calls the
    installed version by the name it takes, without a deprecation warning."""
    import warnings

    ids = random_ids(len(tiny.tokenizer), (2, 6))
    backbone, _ = backbone_and_layers(tiny.model)
    with torch.no_grad():
        cache = output_cache(tiny.model(input_ids=ids, use_cache=True))
        for name in ("past_key_values", "cache"):
            tiny.memory._on_backbone(backbone, (), {"input_ids": ids[:, -1:], name: cache})
            assert torch.equal(tiny.memory._history, torch.cat([ids, ids[:, -1:]], 1))
        tiny.model(input_ids=ids, use_cache=True)  # the history of a fresh prompt again
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            tiny.model(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(tiny.model, cache))


def test_a_trained_short_conv_is_refused_until_cached_decoding_supports_it(tmp_path):
    from safetensors.torch import load_file, save_file

    init_tiny(tmp_path / "m")
    weights_file = tmp_path / "m" / "engram" / "weights.safetensors"
    weights = load_file(str(weights_file))
    conv = next(k for k in weights if k.endswith("conv.weight"))
    weights[conv] = torch.ones_like(weights[conv])
    save_file(weights, str(weights_file))
    with pytest.raises(CheckpointError, match="non-zero short conv"):
        load_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_encoding_gives_the_ids_of_one_by_one_encoding(family, tiny_checkpoints):
    """The compiler tokenizes in batches through the tokenizer's backend; serving encodes one
    prompt at a time. Both must give the same ids (a fact's rows depend on them)."""
    em = load_checkpoint(tiny_checkpoints(family), with_adapter=False)
    texts = ["My dentist is called", " Dr. Akeredolu", "Ünïcödé  spaces\tand\nnewlines", "x", "  leading",
             "émigré café naïve", "1234 5678", "a" * 300]
    assert em.encode_prompts(texts) == [em.encode_prompt(t) for t in texts]
    assert em.encode_answers(texts) == [em.encode_answer(t) for t in texts]
