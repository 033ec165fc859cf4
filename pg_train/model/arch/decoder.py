"""The Qwen2 decoder with its last layer computed only for the rows whose output is used.

Every pass of the objective reads a few rows of the LLM's final hidden state: pass 1 the T
caption rows (lm_head), pass 2 the [SEG] row, the teacher's prefill the last row. Layers below
the last must run on every row (later rows attend to them), but in the last layer the other
rows only supply keys and values: their query, attention output, o_proj, MLP and final norm
are never read. `decoder_hidden_states` skips them — exact (the same function of the kept
rows), with the saving 1/num_layers of the LLM's per-row work and of its stored activations
(about 3% on Sa2VA-4B's 36 layers; on the 2-layer `bench` preset it took a CPU step from
23.7 to 14.7 s — `python -m pg_train.bench.step --preset bench --variants ours,untrimmed,seed`).

Layers are called through their modules (`layer(...)`, `attn.q_proj(...)`), so LoRA
wrappers, 4-bit bases, forward hooks and DeepSpeed see them as in Qwen2Model.forward, whose
layer loop this mirrors.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward, rotate_half


def decoder_hidden_states(
    decoder,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: slice,
    cache=None,
    trim: bool = True,
) -> torch.Tensor:
    """Final-norm hidden states [B, R, D] of rows `keep` (a step-1 slice of the L input rows).

    decoder: a Qwen2Model (`language_model.model`); attention_mask [B, L] (or [B, past + L]
    with a cache), 1 = real token; position_ids [B, L]; cache: a transformers Cache to fill
    with every row's keys and values (the teacher's decoding), or None. `trim=False`: every
    layer on every row, then the rows sliced out — the same values (the model's
    `trim_last_layer`, off only for the benchmark's `untrimmed` variant and the literal baseline).
    """
    if decoder.has_sliding_layers or decoder.config._attn_implementation != "sdpa":
        raise ValueError("decoder_hidden_states supports Qwen2 with full attention under SDPA only")
    rows = range(inputs_embeds.shape[1])[keep]
    if rows.step != 1 or len(rows) == 0:
        raise ValueError(
            f"keep must select a non-empty run of consecutive rows, got {keep} of {inputs_embeds.shape[1]}"
        )
    if not trim:
        return decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state[:, keep]
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
    )
    hidden = inputs_embeds
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    *lower, last = decoder.layers[: decoder.config.num_hidden_layers]
    for layer in lower:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    past = 0 if cache is None else cache.get_seq_length(last.self_attn.layer_idx)
    hidden = _last_layer_rows(last, hidden, mask, position_embeddings, rows, past, cache)
    return decoder.norm(hidden)


def _last_layer_rows(
    layer, hidden: torch.Tensor, mask, position_embeddings, rows: range, past: int, cache
) -> torch.Tensor:
    """Qwen2DecoderLayer.forward for the query rows `rows`, keys and values from every row."""
    attn = layer.self_attn
    B, L, _ = hidden.shape
    kept = slice(rows.start, rows.stop)
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed[:, kept]).view(B, len(rows), -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(B, L, -1, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(B, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = _rotate(query, cos[:, kept], sin[:, kept]), _rotate(key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    if mask is None:  # no padding: plain causal attention over past + L keys
        query_at = torch.arange(rows.start, rows.stop, device=hidden.device) + past
        mask = (torch.arange(key.shape[2], device=hidden.device)[None] <= query_at[:, None])[None, None]
    else:
        mask = mask[:, :, kept]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(
        attn,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        sliding_window=attn.sliding_window,
    )
    hidden = hidden[:, kept] + attn.o_proj(out.reshape(B, len(rows), -1).contiguous())
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, R, hd] at cos/sin [B, R, hd] (Qwen2's apply_rotary_pos_emb, one tensor)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
