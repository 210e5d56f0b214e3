"""The compiler's leaner ops (engram_core.fused_ops: fused RMSNorm, rotary without rotate_half):
same logits, bit for bit on CPU, for the families they replace; nothing replaced elsewhere;
everything restored after the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import CompileOptions, Fact, compile_facts
from engram_core.fused_ops import _lean_apply_rotary_pos_emb, fused_ops


@pytest.mark.parametrize("family,expected", [("llama", True), ("qwen2", True), ("gpt2", False)])
def test_fused_ops_give_the_same_logits_and_are_restored(family, expected, tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints(family))
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = em.model(input_ids=ids).logits
        with fused_ops(em.model) as replaced:
            got = em.model(input_ids=ids).logits
            norms = [m for m in em.model.modules() if "forward" in m.__dict__]
        after = em.model(input_ids=ids).logits
    layers = em.model.config.num_hidden_layers if hasattr(em.model.config, "num_hidden_layers") else 0
    assert replaced == (2 * layers + 1 + 1 if expected else 0) == len(norms) + (1 if expected else 0)  # + the rotary
    assert torch.equal(got, want) and torch.equal(after, want)
    assert not any("forward" in m.__dict__ for m in em.model.modules())
    if expected:
        import sys

        attention = next(m.self_attn for m in em.model.modules() if hasattr(m, "self_attn"))
        assert sys.modules[type(attention).__module__].apply_rotary_pos_emb is not _lean_apply_rotary_pos_emb
    with fused_ops(em.model, enabled=False) as replaced:
        assert replaced == 0


def test_an_rms_norm_with_another_formula_is_left_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OnePlusWeight(LlamaRMSNorm):  # Gemma-style: x * (1 + w)
        def forward(self, hidden_states):
            h = hidden_states.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).to(hidden_states.dtype)

    model = torch.nn.Sequential(LlamaRMSNorm(8), OnePlusWeight(8))
    with fused_ops(model) as replaced:
        assert replaced == 1 and "forward" in model[0].__dict__ and "forward" not in model[1].__dict__


def test_compiling_with_fused_ops_gives_the_same_deltas(tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints("llama"))
    facts = [Fact(f"user-{u}", f"fact-{k}", t, a) for u in range(3)
             for k, (t, a) in enumerate([("My dentist is Dr.", " Rex"), ("The name of my cat is", " Luna Park")])]
    plain = compile_facts(em, facts, CompileOptions(fused_ops=False))
    fused = compile_facts(em, facts, CompileOptions(fused_ops=True))
    assert plain.ok == fused.ok > 0
    assert [r.loss for r in plain.facts] == [r.loss for r in fused.facts]
    for user, delta in plain.deltas.items():
        assert np.array_equal(delta.row_ids, fused.deltas[user].row_ids)
        assert delta.values.tobytes() == fused.deltas[user].values.tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_lean_rotary_gives_the_bits_of_transformers_rotary(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    q = (torch.randn(3, 4, 7, 10, generator=g) * 5).to(dtype)
    k = (torch.randn(3, 2, 7, 10, generator=g) * 5).to(dtype)
    angle = torch.randn(3, 7, 10, generator=g) * 3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = _lean_apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_blocks_that_overlap_in_time_restore_everything_when_the_last_ends(tiny_checkpoints):
    """Two compiles in one process (threads) enter and leave in any order: the originals are
    back exactly when the last block ends."""
    import sys

    em = load_checkpoint(tiny_checkpoints("llama"))
    attention = next(m.self_attn for m in em.model.modules() if hasattr(m, "self_attn"))
    namespace = sys.modules[type(attention).__module__]
    original = namespace.apply_rotary_pos_emb
    a, b = fused_ops(em.model), fused_ops(em.model)
    assert a.__enter__() == b.__enter__() > 1
    a.__exit__(None, None, None)  # the first to enter leaves first
    assert namespace.apply_rotary_pos_emb is _lean_apply_rotary_pos_emb
    assert any("forward" in m.__dict__ for m in em.model.modules())
    b.__exit__(None, None, None)
    assert namespace.apply_rotary_pos_emb is original
    assert not any("forward" in m.__dict__ for m in em.model.modules())
