"""Batched caption generation over `inputs_embeds` with a KV cache (left padding)."""

from __future__ import annotations

import torch

from ..arch.decoder import decoder_hidden_states
from ..text.stopping import EndTextStop


def fast_decoding(static_cache: bool | None, cuda_graphs: bool | None, device: torch.device) -> tuple[bool, bool]:
    """(static_cache, cuda_graphs) with None resolved for `device`: both on CUDA, where the
    fixed-shape step replayed from a CUDA graph removes the per-token launch cost (issue 19) and
    gives the eager step's tokens on the same bucket shapes; both off elsewhere, where nothing is
    captured and the padded buckets would only cost. An explicit cuda_graphs=True implies the
    static cache (a graph replays fixed shapes)."""
    cuda = device.type == "cuda"
    static = static_cache if static_cache is not None else (cuda or bool(cuda_graphs))
    graphs = cuda_graphs if cuda_graphs is not None else (cuda and static)
    return static, graphs


@torch.no_grad()
def generate_from_embeds(
    language_model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_token_id: int,
    pad_token_id: int,
    suppress_token_ids: torch.Tensor | None = None,
    stop: EndTextStop | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    check_every: int | None = None,
    static_cache: bool | None = False,
    cuda_graphs: bool | None = False,
    trim_last_layer: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or sampled) decoding of a left-padded batch.

    inputs_embeds [B, P, D], attention_mask [B, P] (left padding: every row ends with a real
    token). Returns (tokens [B, T] padded with `pad_token_id` after each row's caption, lengths [B]).
    A row stops at eos or, with `stop`, when its decoded text contains the end text
    (`EndTextStop`: the caption is cut before it and re-encoded as a whole); neither is part of
    the caption. `min_new_tokens`: the first tokens may not end the caption or start the end
    text. Suppressed ids get -inf logits before selection. Whether every row has stopped is
    read on the host every `check_every` steps (default: every step on CPU, every 8 on CUDA,
    where each read is a device sync); the extra steps only produce padding.

    `static_cache`: keys and values in buffers allocated once for prompt + max_new_tokens
    (transformers' StaticCache, written in place at a device-side position) and an attention
    mask of that full length, so every decoding step has the same shapes and no host-side
    bookkeeping — what capturing the step in a CUDA graph needs. Same tokens as the dynamic
    cache (tests/test_generate.py).

    `cuda_graphs` (needs `static_cache`): the per-token step is one fixed-shape function over
    buffers of a shape bucket (pg_train.model.decoding.graph_decode: batch and prompt padded to bucket
    sizes, buffers and KV cache kept between calls), captured once per bucket in a CUDA graph and
    replayed on CUDA; elsewhere, and for sampled decoding, the same step runs eagerly. Same
    tokens as the paths above (tests/test_generate.py).

    None for either: resolved for the device by `fast_decoding` (on CUDA, off elsewhere).
    """
    from transformers import DynamicCache, StaticCache

    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    check_every = check_every or (8 if device.type == "cuda" else 1)
    static_cache, cuda_graphs = fast_decoding(static_cache, cuda_graphs, device)
    if cuda_graphs and not static_cache:
        raise ValueError("cuda_graphs needs static_cache (a graph replays fixed shapes)")
    if cuda_graphs and B and max_new_tokens > 0:
        from .graph_decode import DecodeRules, generate_bucketed

        rules = DecodeRules(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
            stop=stop,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            trim_last_layer=trim_last_layer,
        )
        tokens, lengths = generate_bucketed(
            language_model,
            inputs_embeds,
            attention_mask,
            max_new_tokens=max_new_tokens,
            rules=rules,
            suppress_token_ids=suppress_token_ids,
            check_every=check_every,
        )
        return _finish(tokens, lengths, stop, max_new_tokens, min_new_tokens, pad_token_id)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    P = attention_mask.shape[1]
    if static_cache:
        cache = StaticCache(config=language_model.config, max_cache_len=P + max_new_tokens)
        # Future columns start at 0 and are filled as tokens arrive: one shape for every step.
        attention_mask = torch.cat(
            [attention_mask, torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)], dim=1
        )
        step_mask = attention_mask[:, :P]
    else:
        cache = DynamicCache()
        step_mask = attention_mask
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    states = stop.initial(B, device) if stop is not None else None
    embed = language_model.get_input_embeddings()
    step_embeds = inputs_embeds
    step_positions = position_ids
    suppress = suppress_token_ids.to(device) if suppress_token_ids is not None and suppress_token_ids.numel() else None
    for t in range(max_new_tokens):
        # Only the last row's logits are read: its last layer runs on that row alone (keys and
        # values for every row still go to the cache).
        hidden = decoder_hidden_states(
            language_model.model,
            step_embeds,
            step_mask,
            step_positions,
            slice(-1, None),
            cache=cache,
            trim=trim_last_layer,
        )
        logits = language_model.lm_head(hidden[:, -1]).float()
        if suppress is not None:
            logits[:, suppress] = float("-inf")
        if t < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
            if states is not None:
                logits = logits.masked_fill(stop.end_starting(states)[:, : logits.shape[1]], float("-inf"))
        if do_sample:
            logits = logits / max(temperature, 1e-5)
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
        tokens[:, t] = next_ids
        if states is not None:
            states = torch.where(finished, states, stop.advance(states, next_ids))
            stop_now = stop.matched(states) & ~finished
            # The text rule keeps the row's tokens through the one that completed the end
            # text; trim() cuts them afterwards.
            stop_at = torch.full_like(lengths, t + 1)
        else:
            stop_now = (next_ids == eos_token_id) & ~finished
            stop_at = torch.full_like(lengths, t)
        lengths = torch.where(stop_now, stop_at, lengths)
        finished |= stop_now
        if (t + 1) % check_every == 0 and finished.all():
            break
        if static_cache:
            attention_mask[:, P + t] = (~finished).long()
        else:
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        step_mask = attention_mask
        step_positions = step_positions[:, -1:] + 1
        step_embeds = embed(next_ids)[:, None]
    return _finish(tokens, lengths, stop, max_new_tokens, min_new_tokens, pad_token_id)


def _finish(
    tokens: torch.Tensor, lengths: torch.Tensor, stop, max_new_tokens: int, min_new_tokens: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding loop's tokens [B, max_new_tokens] and stop positions -> (captions, lengths)."""
    B, device = tokens.shape[0], tokens.device
    if stop is not None:
        captions = stop.trim(tokens, lengths, max_new_tokens, min_new_tokens)
        lengths = torch.tensor([len(c) for c in captions], dtype=torch.long, device=device)
        width = int(lengths.max().item()) if B else 0
        tokens = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
        for row, caption in enumerate(captions):
            tokens[row, : len(caption)] = torch.tensor(caption, dtype=torch.long, device=device)
        return tokens, lengths
    # Blank everything from each row's stop onwards (the eos included).
    positions = torch.arange(max_new_tokens, device=device)[None]
    tokens = tokens.masked_fill(positions >= lengths[:, None], pad_token_id)
    width = int(lengths.max().item()) if B else 0
    return tokens[:, : max(width, 0)], lengths
