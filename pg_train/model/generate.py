"""Batched caption generation over `inputs_embeds` with a KV cache (left padding)."""
from __future__ import annotations

import torch

from .decoder import decoder_hidden_states


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
    stop_sequences: list[list[int]] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or sampled) decoding of a left-padded batch.

    inputs_embeds [B, P, D], attention_mask [B, P] (left padding: every row ends with a real
    token). Returns (tokens [B, T] padded with `pad_token_id` after each row's stop, lengths [B]).
    The stop token itself (eos, or a stop sequence such as the template's end text) is not part
    of the returned caption; `min_new_tokens` forbids stopping earlier. Suppressed ids get -inf logits before selection.
    """
    from transformers import DynamicCache

    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    embed = language_model.get_input_embeddings()
    step_embeds = inputs_embeds
    step_positions = position_ids
    for t in range(max_new_tokens):
        # Only the last row's logits are read: its last layer runs on that row alone (keys and
        # values for every row still go to the cache).
        hidden = decoder_hidden_states(language_model.model, step_embeds, attention_mask, step_positions, slice(-1, None), cache=cache)
        logits = language_model.lm_head(hidden[:, -1]).float()
        if suppress_token_ids is not None and suppress_token_ids.numel():
            logits[:, suppress_token_ids.to(device)] = float("-inf")
        if t < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
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
        stop_now = (next_ids == eos_token_id) & ~finished
        stop_at = torch.full_like(lengths, t)
        for seq in stop_sequences:
            n = len(seq)
            if n and t + 1 >= n:
                hit = (tokens[:, t + 1 - n : t + 1] == torch.tensor(seq, device=device)).all(dim=1) & ~finished
                hit &= t + 1 - n >= min_new_tokens  # a stop may not make the caption shorter than the minimum
                stop_at = torch.where(hit & ~stop_now, torch.full_like(stop_at, t + 1 - n), stop_at)
                stop_now |= hit
        lengths = torch.where(stop_now, stop_at, lengths)
        finished |= stop_now
        if finished.all():
            break
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        step_positions = step_positions[:, -1:] + 1
        step_embeds = embed(next_ids)[:, None]
    # Blank everything from each row's stop onwards (stop token / end text included).
    positions = torch.arange(max_new_tokens, device=device)[None]
    tokens = tokens.masked_fill(positions >= lengths[:, None], pad_token_id)
    width = int(lengths.max().item()) if B else 0
    return tokens[:, : max(width, 0)], lengths
