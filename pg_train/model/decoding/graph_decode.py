"""Teacher decoding as one fixed-shape step that a CUDA graph can replay (`objective.cuda_graphs`).

Why: on a GPU the teacher's decoding is host-bound — every token launches ~36 layers of small
kernels, and launching them takes longer than running them (issue 19: ~82 ms per token for
Sa2VA-4B at batch 8, flat in batch size). A CUDA graph records those launches once and replays
them with one call per token.

The step (`decode_step`): embed the previous token, the decoder layers through the model's own
modules (LoRA adapters included: `decoder_hidden_states`), lm_head, the suppressed ids, the
`min_new_tokens` rule, greedy selection, the stop rule's state advance, and the in-place updates
of the attention-mask column, the positions, the step counter and the static KV cache (transformers'
StaticCache: it writes at a device-side position). It takes no host-side argument that changes
between tokens and reads nothing back to the host: everything a token depends on lives in the
`DecodeBucket`'s buffers, which it updates in place — exactly what a replayed graph needs. The
same function runs eagerly off CUDA (and for sampled decoding); capture is the only CUDA-specific
part (`DecodeBucket.step`).

Buckets: a graph is bound to its shapes, so prompts and batches are padded to a few bucket sizes
(`BucketPolicy`): the prompt by more left padding (rows already end where their answer starts),
the batch by dummy rows (copies of the last real row, finished from the start: they only ever
emit padding and are dropped). One bucket per (batch, prompt, caption length, dtype, device) and
model holds the KV cache, the buffers and the graph; the least recently used beyond `max_buckets`
is dropped. Off CUDA the default policy is exact shapes (nothing is captured, so padding would only
cost); tests set CUDA's policy on CPU to prove the padded buckets give the same tokens.

Early exit: whether every row has stopped is read on the host every `check_every` steps (8 on
CUDA), so up to that many replays are queued without a sync; the extra steps only emit padding.

Weights: a graph reads the tensors' memory, not the module. The EMA teacher with placement
`same`/`cpu` copies the shadow into the student's own tensors in place (`EMATeacher.as_teacher`,
`p.copy_`), `full:<device>` refreshes its separate model in place, and the optimizer steps in
place, so a captured graph sees the current weights. Anything that rebinds a tensor (`p.data = ...`,
a re-`.to()`, DeepSpeed re-partitioning) changes the data pointers: every call compares them (and
the module's training flag, the decoding rules, the last-layer trim switch) with the capture's and
recaptures when they differ. A step that cannot be captured (a module doing host work) warns
once per bucket and decodes eagerly: the same tokens, without the speed-up (`STATS`).

Sampling: graphs replay the kernels with the default CUDA generator's philox offsets advanced on
the device, but the draws depend on the tensor's size — a padded batch would draw different noise
than today's [B, V] — and a caller's own (CPU) generator cannot be captured at all. So sampled
decoding (`do_sample`) runs the same bucketed step eagerly, drawing for the real rows only (exactly
today's draws); greedy decoding (the teacher's default) is captured.

Why `torch.cuda.CUDAGraph` and not `torch.compile(mode="reduce-overhead")`: replaying the eager
kernels is bitwise the eager step, while Inductor fuses and reorders (RMSNorm, rotary, the
bf16 matmul epilogues) and rounds differently, so captions would no longer be today's token for
token; compiling 36 LoRA-wrapped layers also costs minutes per shape on the device, and the
dynamic prompt/batch sizes would recompile. A manual graph of a fixed-shape step has none of that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
import weakref
from collections import Counter, OrderedDict

import torch

from ..arch.decoder import decoder_hidden_states


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    """How shapes are rounded up so that a few graphs serve every batch."""

    pad_batch: bool = True  # batch rounded up to a power of two (dummy rows)
    prompt_multiple: int = 64  # prompt rounded up to a multiple of max(this, 2**floor(log2 P) / 4) (<= 25% more)
    max_buckets: int = 4  # per model: each holds a KV cache for its shape (Sa2VA-4B: 37 KB per row and position)

    def batch(self, rows: int) -> int:
        return 1 << (rows - 1).bit_length() if self.pad_batch and rows > 0 else rows

    def prompt(self, length: int) -> int:
        if self.prompt_multiple <= 1 or length <= 0:
            return length
        step = max(self.prompt_multiple, (1 << (length.bit_length() - 1)) // 4)
        return -(-length // step) * step


EXACT = BucketPolicy(pad_batch=False, prompt_multiple=1)
# Per device type; any other type gets EXACT. Tests put CUDA's policy under "cpu".
POLICIES: dict[str, BucketPolicy] = {"cuda": BucketPolicy()}
# Eager steps (on a side stream) before a bucket's step is captured: lazy initialisations
# (cuBLAS workspaces, the stop table on the device) must not happen inside the capture.
WARMUP_STEPS = 2
# What the decoding did, for benchmarks and tests: captures, replays, warmup_steps, eager_steps,
# invalidations (weights rebound / rules changed), capture_failures, buckets (created).
STATS: Counter = Counter()
# language model -> OrderedDict[bucket key, DecodeBucket]; a bucket never references its model.
_BUCKETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def policy_for(device: torch.device) -> BucketPolicy:
    return POLICIES.get(device.type, EXACT)


@dataclasses.dataclass
class DecodeRules:
    """The decoding's per-call settings (see generate_from_embeds)."""

    eos_token_id: int
    pad_token_id: int
    min_new_tokens: int = 0
    stop: object | None = None  # EndTextStop
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    rows: int = 0  # real rows (the rest of the bucket are dummies)
    trim_last_layer: bool = True  # decoder_hidden_states' trim (the model's trim_last_layer)


class DecodeBucket:
    """The buffers of one shape bucket (the step's whole state) and, on CUDA, its captured step."""

    def __init__(self, config, batch: int, prompt: int, max_new_tokens: int, device: torch.device):
        from transformers import StaticCache

        self.batch, self.prompt, self.max_new_tokens, self.device = batch, prompt, max_new_tokens, device
        self.cache = StaticCache(config=config, max_cache_len=prompt + max_new_tokens)
        long = {"dtype": torch.long, "device": device}
        self.mask = torch.zeros(batch, prompt + max_new_tokens, **long)  # 1 = attend; future columns 0
        self.positions = torch.zeros(batch, 1, **long)  # of the token the next step feeds
        self.ids = torch.zeros(batch, **long)  # the token the next step feeds
        self.t = torch.zeros((), **long)  # index of the token the next step selects
        self.min_new = torch.zeros((), **long)
        self.tokens = torch.zeros(batch, max_new_tokens, **long)
        self.lengths = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.states = torch.zeros(batch, **long)  # stop-rule automaton states
        self.suppress: torch.Tensor | None = None  # bool [V], set at the prefill (V known then)
        self.eos_column: torch.Tensor | None = None  # bool [V]
        self.graph = None
        self.signature = None
        self.warm = 0
        self.capture_failed = False

    def nbytes(self) -> int:
        """Bytes the bucket holds now: its KV cache (allocated at the first prefill) and buffers;
        a captured graph's private pool comes on top (CUDA, `step_pool_bytes`)."""
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None]
        buffers = [self.mask, self.positions, self.ids, self.t, self.min_new, self.tokens, self.lengths]
        buffers += [self.finished, self.states] + [t for t in (self.suppress, self.eos_column) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors + buffers)

    # ---- per call, eager ------------------------------------------------------------------------
    def load(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, rules: DecodeRules) -> torch.Tensor:
        """Reset the state for a new batch; return the prompt embeddings padded to the bucket."""
        B, P, D = inputs_embeds.shape
        Pb = self.prompt
        self.cache.reset()
        embeds = inputs_embeds.new_zeros(self.batch, Pb, D)
        embeds[:B, Pb - P :] = inputs_embeds
        embeds[B:] = embeds[B - 1]
        self.mask.zero_()
        self.mask[:B, Pb - P : Pb] = attention_mask
        self.mask[B:] = self.mask[B - 1]
        self.tokens.fill_(rules.pad_token_id)
        self.lengths.fill_(self.max_new_tokens)
        self.finished.zero_()
        self.finished[B:] = True
        self.states.zero_()
        self.t.zero_()
        self.min_new.fill_(rules.min_new_tokens)
        return embeds

    def set_rules(self, vocab: int, rules: DecodeRules, suppress_token_ids: torch.Tensor | None) -> None:
        if self.suppress is None or self.suppress.shape[0] != vocab:
            self.suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            self.eos_column = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppress.zero_()
        if suppress_token_ids is not None and suppress_token_ids.numel():
            self.suppress.index_fill_(0, suppress_token_ids.to(self.device), True)
        self.eos_column.zero_()
        self.eos_column[rules.eos_token_id] = True

    def check_graph(self, language_model, rules: DecodeRules) -> None:
        """Drop the captured step if what it baked in changed: tensors rebound (data pointers),
        the training flag (dropout), the decoding rules, the last-layer trim."""
        signature = (
            language_model.training,
            rules.trim_last_layer,
            rules.eos_token_id,
            rules.pad_token_id,
            rules.min_new_tokens > 0,
            rules.stop,
            tuple(t.data_ptr() for t in itertools.chain(language_model.parameters(), language_model.buffers())),
        )
        if self.signature is not None and signature != self.signature:
            if self.graph is not None:
                STATS["invalidations"] += 1
            self.graph, self.capture_failed = None, False
        self.signature = signature

    # ---- per token ------------------------------------------------------------------------------
    def step(self, language_model, rules: DecodeRules, capture: bool) -> None:
        """One decoding step: replayed if captured; else eager (`capture` and a capturer for the
        device: WARMUP_STEPS eager steps, then the capture, then replays)."""
        capturer = CAPTURERS.get(self.device.type) if capture else None
        if capturer is not None and self.graph is not None:
            self.graph.replay()
            STATS["replays"] += 1
            return

        def run():
            decode_step(language_model, self, rules)

        if capturer is None or self.capture_failed:
            run()
            STATS["eager_steps"] += 1
            return
        warm_up, record = capturer
        if self.warm < WARMUP_STEPS:
            warm_up(run, self.device)
            self.warm += 1
            STATS["warmup_steps"] += 1
            return
        try:
            graph = record(run, self.device)
        except Exception as err:  # a module that cannot be captured: decode eagerly, same tokens
            warnings.warn(
                f"CUDA-graph capture of the decoding step failed ({type(err).__name__}: {err}); eager decoding"
            )
            self.capture_failed = True
            STATS["capture_failures"] += 1
            run()
            STATS["eager_steps"] += 1
            return
        self.graph = graph
        STATS["captures"] += 1
        graph.replay()  # the capture recorded the step without running it
        STATS["replays"] += 1


def _cuda_warm_up(run, device: torch.device) -> None:
    """One eager step on a side stream (PyTorch's recipe before a capture)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        run()
    current.wait_stream(side)


def _cuda_record(run, device: torch.device):
    """The step captured, not run. thread_local: another thread's CUDA calls (the student's, with
    ema.overlap; a loader's pinning thread) do not invalidate the capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run()
    return graph


# device type -> (warm_up(run, device), record(run, device) -> an object with replay()). Only CUDA
# captures; tests register a stand-in under "cpu" to drive the capture/replay bookkeeping here.
CAPTURERS = {"cuda": (_cuda_warm_up, _cuda_record)}


def prefill(language_model, bucket: DecodeBucket, embeds: torch.Tensor, rules: DecodeRules, suppress_token_ids):
    """The prompt through the decoder into the bucket's cache, then the first token's selection (eager)."""
    mask = bucket.mask[:, : bucket.prompt]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder_hidden_states(
        language_model.model, embeds, mask, positions, slice(-1, None), cache=bucket.cache, trim=rules.trim_last_layer
    )
    logits = language_model.lm_head(hidden[:, -1]).float()
    bucket.set_rules(logits.shape[-1], rules, suppress_token_ids)
    bucket.positions.copy_(positions[:, -1:])
    select(bucket, logits, rules)


def decode_step(language_model, bucket: DecodeBucket, rules: DecodeRules) -> None:
    """One token for every row: fixed shapes, state in `bucket` updated in place, no host reads."""
    embeds = language_model.get_input_embeddings()(bucket.ids)[:, None]
    hidden = decoder_hidden_states(
        language_model.model,
        embeds,
        bucket.mask,
        bucket.positions,
        slice(-1, None),
        cache=bucket.cache,
        trim=rules.trim_last_layer,
    )
    select(bucket, language_model.lm_head(hidden[:, -1]).float(), rules)


def select(bucket: DecodeBucket, logits: torch.Tensor, rules: DecodeRules) -> None:
    """Logits [Bb, V] -> the next token of every row, and the state after it (generate_from_embeds'
    rules with the step index on the device: the same values as its host-indexed writes)."""
    neg_inf = float("-inf")
    logits = logits.masked_fill(bucket.suppress, neg_inf)
    stop = rules.stop
    if rules.min_new_tokens > 0:
        forbid = bucket.eos_column
        if stop is not None:
            forbid = forbid | stop.end_starting(bucket.states)[:, : logits.shape[1]]
        logits = logits.masked_fill(forbid & (bucket.t < bucket.min_new), neg_inf)
    if rules.do_sample:  # never captured (module doc): draws for the real rows only, as today
        rows = rules.rows
        scaled = logits[:rows] / max(rules.temperature, 1e-5)
        if rules.top_k:
            kth = scaled.topk(rules.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, neg_inf)
        drawn = torch.multinomial(scaled.softmax(-1), 1, generator=rules.generator).squeeze(1)
        next_ids = torch.cat([drawn, drawn.new_zeros(bucket.batch - rows)])
    else:
        next_ids = logits.argmax(-1)
    finished = bucket.finished
    next_ids = torch.where(finished, torch.full_like(next_ids, rules.pad_token_id), next_ids)
    bucket.tokens.index_copy_(1, bucket.t.view(1), next_ids[:, None])
    if stop is not None:
        states = torch.where(finished, bucket.states, stop.advance(bucket.states, next_ids))
        bucket.states.copy_(states)
        stop_now = stop.matched(states) & ~finished
        stop_at = bucket.t + 1  # the text rule keeps the tokens through the one completing the end text
    else:
        stop_now = (next_ids == rules.eos_token_id) & ~finished
        stop_at = bucket.t
    bucket.lengths.copy_(torch.where(stop_now, stop_at, bucket.lengths))
    finished |= stop_now
    bucket.mask.index_copy_(1, (bucket.t + bucket.prompt).view(1), (~finished).long()[:, None])
    bucket.positions.add_(1)
    bucket.ids.copy_(next_ids)
    bucket.t.add_(1)


def kv_cache_bytes(config, batch: int, length: int, elem: int) -> int:
    """Bytes of transformers' StaticCache for `batch` rows of `length` positions: keys and values
    of every layer, [batch, kv_heads, length, head_dim] each, `elem` bytes per element: the
    weights' dtype. (Under autocast over fp32 weights the values are bf16 and the keys fp32, the
    rotary embedding promoting them: 1.5x the bf16 figure; memcheck does not model that mode.)"""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * length * head_dim * elem


def buffer_bytes(batch: int, prompt: int, max_new_tokens: int, vocab: int) -> int:
    """Bytes of a DecodeBucket's own buffers (mask, positions, ids, step counters, tokens,
    lengths, finished, stop states, the suppress and eos columns)."""
    longs = batch * (prompt + max_new_tokens) + 4 * batch + 2 + batch * max_new_tokens
    return 8 * longs + batch + 2 * vocab


def step_pool_bytes(config, batch: int, length: int, elem: int) -> int:
    """Estimate of a captured step's private memory pool: what one decoding step allocates and
    the graph keeps (the allocator reuses blocks inside a capture, so about the step's peak):
    the logits in the weights' dtype and four fp32 [batch, V] copies (float, suppress, the
    min-length mask, argmax input), plus one layer's activations (hidden, q/k/v, attention
    scores over `length` keys, the MLP's three intermediate tensors). An estimate: the exact
    pool is the allocator's business; measured on CUDA only."""
    V, D, inter = config.vocab_size, config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    logits = batch * V * (elem + 4 * 4)
    layer = batch * (6 * D + 3 * inter) * elem + batch * heads * length * 4
    return logits + layer


def get_bucket(language_model, rows: int, prompt: int, max_new_tokens: int, dtype, device) -> DecodeBucket:
    policy = policy_for(device)
    buckets = _BUCKETS.setdefault(language_model, OrderedDict())
    # The autocast state is part of the shape: it decides the KV cache's dtypes (under autocast
    # over fp32 weights the values are bf16, the rotary-promoted keys fp32) and the dtypes a
    # captured step replays (pg_train.precision runs the teacher under the student's autocast).
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    key = (policy.batch(rows), policy.prompt(prompt), max_new_tokens, dtype, device, autocast)
    bucket = buckets.pop(key, None)
    if bucket is None:
        bucket = DecodeBucket(language_model.config, key[0], key[1], max_new_tokens, device)
        STATS["buckets"] += 1
    buckets[key] = bucket
    while len(buckets) > max(policy.max_buckets, 1):
        buckets.popitem(last=False)
    return bucket


def buckets_of(language_model) -> list[DecodeBucket]:
    """The buckets a model holds, least recently used first (tests, benchmarks)."""
    return list(_BUCKETS.get(language_model, {}).values())


def release(language_model=None) -> None:
    """Drop the buckets (KV caches, graphs) of one model, or of all."""
    if language_model is None:
        _BUCKETS.clear()
    else:
        _BUCKETS.pop(language_model, None)


@torch.no_grad()
def generate_bucketed(
    language_model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    rules: DecodeRules,
    suppress_token_ids: torch.Tensor | None,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """generate_from_embeds' loop on a bucket: raw (tokens [B, max_new_tokens], lengths [B]) as its
    loop leaves them (the caller trims). B >= 1 and max_new_tokens >= 1."""
    device = inputs_embeds.device
    B, P, _ = inputs_embeds.shape
    rules = dataclasses.replace(rules, rows=B)
    bucket = get_bucket(language_model, B, P, max_new_tokens, inputs_embeds.dtype, device)
    capture = not rules.do_sample  # (sampling: module doc)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        embeds = bucket.load(inputs_embeds, attention_mask.to(device=device, dtype=torch.long), rules)
        prefill(language_model, bucket, embeds, rules, suppress_token_ids)
        if not rules.do_sample:
            bucket.check_graph(language_model, rules)
        for t in range(max_new_tokens):
            if t:
                bucket.step(language_model, rules, capture)
            if (t + 1) % check_every == 0 and bucket.finished.all():
                break
        # The buffers serve the next call: hand out copies.
        return bucket.tokens[:B].clone(), bucket.lengths[:B].clone()
