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
    # null (default): on CUDA, off elsewhere (model.decoding.generate.fast_decoding)
    static_cache: bool | None = None
    # CUDA: capture the static-cache decoding step in a CUDA graph and replay it (needs static_cache;
    # off CUDA the same bucketed step runs eagerly; pg_train.model.decoding.graph_decode); null: on CUDA
    cuda_graphs: bool | None = None
    # loss (computed at the SAM2 decoder's resolution, see mask_loss)
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    # region -> grid cells: the released model's nearest-neighbour rule, or coverage >= threshold
    region_rule: str = "nearest"
    region_threshold: float = 0.5  # region_rule=coverage only
    # K = 0 (no cell samples the region: thin or small masks): largest (keep the most-covered cell,
    # K = 1) | official (the released code's `region1<vp></vp>`: the region vanishes) | error.
    # Counted either way (region_fallbacks); docs/design.md, "Regions with no cell".
    empty_region_policy: str = "largest"
    # ---- self-training switches (issue 26; docs/design.md, "The objective"). The defaults are
    # today's Pseudo-Gumbel step exactly (tests/test_objectives.py compares with a recorded step).
    # The caption the segmenter reads in pass 2: gumbel (the student's straight-through Gumbel
    # sample) | argmax (the student's most likely token, same straight-through gradient) |
    # teacher (the teacher's caption as text: no gradient reaches the captioner).
    segmenter_reads: str = "gumbel"
    caption_grad: bool = True  # false: the segmentation loss does not reach the caption logits
    # KL anchor: + anchor_weight x KL(student caption distribution || frozen reference), per real
    # caption token of pass 1. Reference: base (the model with its LoRA adapters disabled, no
    # second copy) | snapshot (the trainable tensors as they were when self-training began).
    anchor_weight: float = 0.0
    anchor_reference: str | None = None
    # Confidence filter on teacher captions (mean token log-prob under the teacher): keep those
    # >= filter_min_logprob and the filter_top_fraction most confident of each batch; dropped
    # samples carry no loss and are counted (metrics: filter_kept, filter_dropped).
    filter_min_logprob: float | None = None
    filter_top_fraction: float = 1.0
    # Drift diagnostics (agreement with the teacher, teacher confidence, text use, caption-path
    # gradient shares; metrics.jsonl `drift/*`) every this many optimizer steps (0: off).
    diagnostics_every: int = 0
