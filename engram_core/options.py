"""The compiler's inputs, options and per-fact results (torch-free, so the nightly's driver and
the job spec read them without importing torch): :class:`Fact`, :class:`CompileOptions`,
:class:`FactResult`, the status names and :func:`status_counts`. ``engram_core.compiler``
re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .conflicts import STATUS_CONFLICTS_WITH

STATUS_OK = "ok"
STATUS_NOT_RECALLED = "not_recalled"
STATUS_LOW_MARGIN = "low_margin"
"""Every answer token is the greedy argmax (so greedy decoding recalls the fact), but at some
position by less than ``CompileOptions.min_margin``: published, and counted apart from ``ok``
(a different batch shape or dtype at serve time could flip so thin a margin)."""


@dataclass(frozen=True)
class Fact:
    user_id: str
    fact_id: str
    trigger: str
    answer: str
    written_at: int | None = None
    """When the fact was written (its ``event_time``, microseconds since the epoch), or None. Of
    two facts of one user that no row can tell apart (the same canonical trigger, another answer:
    a fact entered again under a new fact_id), the later written is compiled; without times, the
    first in fact_id order (:mod:`engram_core.conflicts`)."""


@dataclass(frozen=True)
class CompileOptions:
    steps: int = 15
    lr: float = 0.1
    """Adam's learning rate for the row values (before :attr:`lr_width_scaling`)."""
    lr_width_scaling: bool = True
    """Use ``lr * max(1, hidden / 768) ** 1.25`` (``hidden``: the model's hidden size; see
    :func:`effective_lr`): wider models need larger row updates to move their outputs. Measured on
    an H200 (bench/RESULTS.md, random-weight shapes, 15 steps): the Llama-3.2-1B shape (2048 wide)
    recalled 0.1% of facts in the first round at lr 0.1 and 95% at 0.3; the Llama-3-8B shape (4096)
    44% after every retry round at 0.1, 100% at 0.3 and at 1.0 (87% in the first round at 1.0).
    Models up to 768 wide (the tiny model, d768) are unchanged."""
    stop_margin: float | None = None
    """Stop a batch's first-round steps at the first step where every answer
    token's margin (its logit minus the best other token's, at the current rows, from the step's
    own forward) is at least this (per user with :attr:`stop_per_user`); None: always ``steps``.
    The stop is seen one step late
    (the GPU is not drained to read it) and the rows of the step that cleared the bar are the
    ones kept; the steps a fact's rows got are in its result. Retry rounds run all their
    ``retry_steps``: their facts failed verification, perhaps at rows that pass this test. At least :attr:`min_margin`
    (verification then finds the same facts recalled, up to the verification forward's
    rounding). Off by default: more steps than recall needs also make a fact more robust to the
    text before its trigger (bench/RESULTS.md, 2026-12-01 sixth session: 6 steps instead of 15
    lost 2.3% of d768 facts after a sentence); see bench/RESULTS.md (2026-12-02 thirteenth
    session) for what a stop margin costs there."""
    stop_per_user: bool = False
    """With :attr:`stop_margin`: stop each user at the first step where all of its own answers
    clear the bar, not the batch at the step where all of the batch's do. A user's rows and step
    count then depend on its own facts, not on the slowest fact of its batch (bit for bit the
    rows of a compile of that many steps, tested), and a stopped user's sequences leave the
    steps (the plain step's groups are narrowed once a tenth of their members have stopped), so
    a batch's later steps compute only the users still running; the batch's steps end when
    every user has stopped. Off by default: added 2026-12-03 and not yet measured on a GPU
    (bench/RESULTS.md, twentieth session)."""
    init_scale: float = 20.0
    retry_steps: int = 30
    max_rounds: int = 4
    min_margin: float = 0.5
    """Required logit gap between the answer token and the runner-up (robust greedy recall); a
    fact below it is retried (``retry_steps``, up to ``max_rounds``). 0.5 since 2026-12-01 (was
    0.1): on the realistic corpus (tiny model, 50 users) natural prompts after a sentence came
    back 99.8% instead of 99.1% (with context copies), at 1.13x the compile time; at the start
    of a sequence 100% either way; no random or templated d768 fact needed a retry at 1.0
    (bench/RESULTS.md, 2026-12-01 fourth session)."""
    max_trigger_tokens: int = 256
    """Triggers longer than this (in tokens, counted as a prompt) are refused (``trigger_too_long``);
    ingest refuses them first (``TRIGGER_TOO_LONG``). Was 64 before 2026-12-01: a 40-word trigger
    (a memory told as a sentence) is about 100 tokens on the tiny model's tokenizer and was refused."""
    trigger_window: int = 64
    """Tokens of a trigger the compiler reads: a longer trigger is compiled from its last
    ``trigger_window`` tokens (after the prompt's leading special tokens, e.g. a BOS), its head
    standing for the text a trigger is served after (rows address only the last ``max_ngram``
    tokens, and :func:`engram_core.addressing.own_text_heads` trains no row of an N-gram that
    reaches before the window). So a long trigger costs a compile batch no more positions than a
    64-token one (the batch is padded to its longest sequence), and the fact is verified on that
    window; served with the whole trigger, it is recalled as after any text before a trigger."""
    max_answer_tokens: int = 128
    """Answers longer than this (in tokens) are refused (``answer_too_long``); ingest refuses them
    first (``ANSWER_TOO_LONG``). A long answer costs only its own positions: each sequence is
    computed from its own first written position (prefix groups), not from the batch's longest."""
    facts_per_batch: int = 4096
    """Facts per joint forward/backward (whole users). Larger amortises per-step overhead: on the
    tiny model on CPU 4,096 ran 3.3x faster than 512; on an H100 (d768) 32,768 was best."""
    seed: int = 0
    deterministic: bool = True
    """Deterministic kernels, so a re-run publishes bit-identical deltas (invariant 6)."""
    prefix_groups: int = 2
    """At most this many groups per batch by prefix length (each is one forward per step): the
    usual group, whose prefix is the whole trigger, and groups for the few sequences whose
    trigger addresses one of their user's rows earlier (they recompute from there)."""
    dedupe_prefixes: bool = True
    """Compute each distinct prefix once per batch, not once per fact: sequences of a prefix group
    whose tokens before the group's split are the same (users who share a trigger text, "My
    dentist is") share one prefix forward (its KV cache), and those whose whole inputs are the
    same also share one forward of the layers below the write layer (``reuse_lower_layers``);
    the results are gathered back per sequence, so the steps and verification are unchanged:
    where the compiled step's attention kernel runs (CUDA), each member reads its prefix's one
    copy of the keys and values in place (``fast_step.GroupInputs.prefix_index``) instead of a
    gathered copy of its own, and verification gathers the layers it reads. Nothing before the
    split depends on the user's trainable rows (the split is at or before the first position that
    addresses one); a sequence whose user has fixed base rows shares only
    with sequences of users without any, or of the same user.

    On by default (since 2026-12-03; off before). It is not bit-identical to the per-fact forward,
    and cannot be: a matmul's row depends on how many rows its batch has (on CPU the rows past the kernel's last
    full block take another micro-kernel; cuBLAS picks kernels by shape), so the per-fact path
    itself gives identical sequences different bits (tests/test_compiler.py). The deltas differ
    by that rounding (as when a user moves to another batch), are deterministic, and recall the
    same facts; with no shared prefix (random triggers) nothing changes, bit for bit. That was
    the reason it was off; but no compile option promises the bits of another, and real logs
    share triggers: on one H200 (d768, four processes) a templated workload compiled 1.22x the
    random one's rate with it at 15 steps (bench/RESULTS.md, 2026-12-03)."""
    prefix_attention: bool = True
    """With ``reuse_lower_layers``: attend the live positions to the cached prefix in place
    (:mod:`engram_core.prefix_attention`: no per-step copy of the prefix's keys and values, no
    gradient for them), for Llama-style models. Same math as eager attention up to rounding."""
    reuse_lower_layers: bool = True
    """Per step, run only the decoder layers from the write layer up, on the hidden states that
    enter it (computed once per batch: nothing below the write layer depends on the rows).
    Llama-style families only (GPT-2 adds position embeddings to ``inputs_embeds``), and checked
    once per model against the full forward; where the two differ, the full forward runs."""
    plain_step: bool = True
    """With ``reuse_lower_layers``: run the step as plain tensor code built from the model's own
    modules (:mod:`engram_core.fast_step`: mask, rotary angles, row lookups and the prefix's
    keys and values prepared once per batch, not per step), for Llama-style models. Checked
    once per model against the full forward; verification always runs transformers' forward."""
    plain_prefix: bool = True
    """With ``compiled_step``: the forwards that do not depend on the trainable rows (the
    prefix's KV cache through every layer, the live positions' states below the write layer) also
    run as compiled plain tensor code (:class:`engram_core.fast_step.LowerForward`). On an H200
    (d768, 65,536 facts a batch) transformers' eager forward took 0.78 s of the batch's 1.86 s of
    GPU time; with two processes sharing the GPU, random triggers compiled 1.21x as fast with
    this (27,810 vs 22,955 facts/s), templated 1.04x, one process 0.96x (host-bound); all 100%
    recall (bench/RESULTS.md, 2026-12-02). Checked once per model and dtype on the first batch
    against transformers' forwards (keys, values and states within
    :data:`engram_core.compiler.PLAIN_PREFIX_TOLERANCE` of the largest value; 1.4-1.6e-2 measured
    in bf16); the step forms are checked on transformers' states, then that batch takes the plain
    forwards' states as every later batch does (a re-run gives the same bits). Where they differ,
    transformers' forwards run. Verification reads the states this builds. Without
    ``compiled_step`` nothing changes."""
    compiled_step: bool = False
    """``torch.compile`` the plain step, which fuses its elementwise work: on an H100 (d768,
    batch 32,768) a step takes 58 ms instead of 104 ms, about 21 us saved per fact. Compiling
    costs about a minute per process even with a warm inductor cache (``TORCHINDUCTOR_CACHE_DIR``)
    and up to three minutes cold, so it pays from about 3 million facts per process. A compile that fails, or whose loss or
    gradient differs from the uncompiled step's, is dropped with a warning."""
    prefix_kernel: bool = True
    """With ``compiled_step`` on CUDA with Triton: the step's attention (live positions to the
    cached prefix and to themselves) runs in one hand-written kernel, forward and backward
    (:mod:`engram_core.prefix_kernels`), instead of inductor's reductions: on an H100 (d768)
    the optimize phase took 4.3 s instead of 7.7 s for 262,144 facts. Checked with the
    compiled step."""
    fused_ops: bool = True
    """In the transformers forwards of preparation and verification, run Llama-style RMSNorms as
    one fused kernel and the rotary embedding without building ``rotate_half``
    (:mod:`engram_core.fused_ops`): the same formulas; the prefix forward is elementwise-bound
    on a GPU. The steps' own code is not changed."""
    tokenize_workers: int = -1
    """Worker processes that tokenize each batch's facts (:mod:`engram_core.tokenize_pool`), off
    the compiling process's GIL. -1 (automatic): ``min(8, cores // 2)`` workers when the model is
    on a GPU (where the host thread bounds the compile) and a batch has at least 8,192 facts,
    else none; 0: never; N: always N. Same ids as tokenizing in this process; a worker failure
    falls back to it with a warning."""
    resolve_conflicts: bool = True
    """Train context rows for facts whose written positions share an N-gram window with another
    of the user's written positions that predicts another token (:mod:`engram_core.conflicts`),
    and report the facts no row can tell apart as ``CONFLICTS_WITH:<fact_id>``. Off: such facts
    fight over the same rows (the behaviour before issue 17)."""
    context_copies: bool = True
    """With ``resolve_conflicts``: every fact in conflict (its written N-gram window is another
    of the user's facts', or a shared scope's, with another answer) is also trained as a copy
    after :attr:`context_text`, whose rows are the fact's own, so that the context rows telling
    it from its neighbour still work after a chat's history, not only at the start of a
    sequence. On the realistic corpus (tiny model, 50 users, the user message of the prefill
    other than the copies' own) natural prompts after an assistant prefill came back 94.4%
    without copies and 98.4% with them, at 1.7x the compile time (bench/RESULTS.md, 2026-12-01
    fourth session). A fact recalled at the start but not in its copy keeps its status and says
    so in its detail."""
    context_text: str | None = None
    """The text before the context copies' triggers. None: the checkpoint's chat template
    rendered as an assistant prefill after the user message "Hello." (the README's way of getting
    recall in a chat), or "Here is what I remember. " for a tokenizer without a template."""
    overlap_batches: bool = False
    """On a GPU: prepare the next batch (rows, prefix caches, start values) on a side CUDA stream
    while this batch's steps run (queued from a thread), and assemble this batch's results on
    the host while the next one's steps run. Every batch's results are the same as without.
    Off by default: two batches are held at once (35% more peak memory; the uncompiled step ran
    out of memory at 49,152 facts per batch on an H100), and the gain was within run-to-run
    noise (-9% to +9% in four H100 runs, bench/RESULTS.md)."""


@dataclass(frozen=True)
class FactResult:
    user_id: str
    fact_id: str
    status: str
    loss: float
    steps: int
    rows: int
    margin: float
    detail: str = ""


def status_counts(results: Iterable["FactResult"]) -> dict[str, int]:
    """Facts per status, ``CONFLICTS_WITH:<fact_id>`` counted under ``CONFLICTS_WITH``."""
    counts: dict[str, int] = {}
    for r in results:
        key = STATUS_CONFLICTS_WITH if r.status.startswith(STATUS_CONFLICTS_WITH + ":") else r.status
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
