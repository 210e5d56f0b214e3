"""The compiler's fused RMSNorm (engram_core.fused_norms): same logits, bit for bit on CPU, for
the families it replaces; nothing replaced elsewhere; everything restored after the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import CompileOptions, Fact, compile_facts
from engram_core.fused_norms import fused_rms_norms


@pytest.mark.parametrize("family,expected", [("llama", True), ("qwen2", True), ("gpt2", False)])
def test_fused_norms_give_the_same_logits_and_are_restored(family, expected, tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints(family))
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = em.model(input_ids=ids).logits
        with fused_rms_norms(em.model) as replaced:
            got = em.model(input_ids=ids).logits
            norms = [m for m in em.model.modules() if "forward" in m.__dict__]
        after = em.model(input_ids=ids).logits
    layers = em.model.config.num_hidden_layers if hasattr(em.model.config, "num_hidden_layers") else 0
    assert replaced == (2 * layers + 1 if expected else 0) == len(norms)
    assert torch.equal(got, want) and torch.equal(after, want)
    assert not any("forward" in m.__dict__ for m in em.model.modules())
    with fused_rms_norms(em.model, enabled=False) as replaced:
        assert replaced == 0


def test_an_rms_norm_with_another_formula_is_left_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OnePlusWeight(LlamaRMSNorm):  # Gemma-style: x * (1 + w)
        def forward(self, hidden_states):
            h = hidden_states.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).to(hidden_states.dtype)

    model = torch.nn.Sequential(LlamaRMSNorm(8), OnePlusWeight(8))
    with fused_rms_norms(model) as replaced:
        assert replaced == 1 and "forward" in model[0].__dict__ and "forward" not in model[1].__dict__


def test_compiling_with_fused_norms_gives_the_same_deltas(tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints("llama"))
    facts = [Fact(f"user-{u}", f"fact-{k}", t, a) for u in range(3)
             for k, (t, a) in enumerate([("My dentist is Dr.", " Rex"), ("The name of my cat is", " Luna Park")])]
    plain = compile_facts(em, facts, CompileOptions(fused_norms=False))
    fused = compile_facts(em, facts, CompileOptions(fused_norms=True))
    assert plain.ok == fused.ok > 0
    assert [r.loss for r in plain.facts] == [r.loss for r in fused.facts]
    for user, delta in plain.deltas.items():
        assert np.array_equal(delta.row_ids, fused.deltas[user].row_ids)
        assert delta.values.tobytes() == fused.deltas[user].values.tobytes()
