"""The objectives' shared settings (`objective:` in a training config): caption lengths, the
teacher's decoding, masking and Gumbel temperature, the mask loss's weights and the region rule.
The supervised and pseudo-label objectives read the parts they share with Pseudo-Gumbel from
here, so none of them imports another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PseudoGumbelConfig:
    max_caption_len: int = 64
    min_caption_len: int = 1  # an empty caption carries no gradient to the language side
    mask_ratio: float = 0.25
    tau: float = 0.7
    topk: int = 128
    # teacher decoding: greedy unless do_sample
    do_sample: bool = False
    temperature: float = 1.0
    sample_top_k: int = 0
    # decode with key/value buffers allocated once and fixed-shape steps (graph-ready; same tokens)
    # null (default): on CUDA, off elsewhere (model.generate.fast_decoding)
    static_cache: bool | None = None
    # CUDA: capture the static-cache decoding step in a CUDA graph and replay it (needs static_cache;
    # off CUDA the same bucketed step runs eagerly; pg_train.model.graph_decode); null: on CUDA
    cuda_graphs: bool | None = None
    # loss (computed at the SAM2 decoder's resolution, see mask_loss)
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    # region -> grid cells: the released model's nearest-neighbour rule, or coverage >= threshold
    region_rule: str = "nearest"
    region_threshold: float = 0.5  # region_rule=coverage only
    empty_region_policy: str = "largest"  # K = 0: fall back to the most-covered cell and count, or error
