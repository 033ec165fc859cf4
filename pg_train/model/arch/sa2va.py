"""The Sa2VA model: InternViT + mlp1 + Qwen2 (+ LoRA) + SAM2 grounding + text_hidden_fcs.

Module names are the released checkpoint's names (`vision_model`, `mlp1`, `language_model`,
`grounding_encoder.sam2_model`, `text_hidden_fcs`), so loading is a prefix mapping.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..text.templates import PromptBuilder
from ..text.tokenizer import special_id_mask
from .decoder import decoder_hidden_states
from .presets import ModelPreset
from .sam2_grounding import GroundingEncoder
from .vision import InternVisionModel, build_mlp1, pixel_shuffle_v2


def build_language_model(preset: ModelPreset):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = preset.language
    config = Qwen2Config(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=dims.max_position_embeddings,
        rms_norm_eps=dims.rms_norm_eps,
        rope_theta=dims.rope_theta,
        tie_word_embeddings=dims.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


class Sa2VAModel(nn.Module):
    def __init__(
        self,
        preset: ModelPreset,
        token_ids: dict[str, int],
        tokenizer=None,
        template: str = "sa2va",
        chat_template: str | None = None,
    ):
        super().__init__()
        self.preset = preset
        self.tokenizer = tokenizer
        self.token_ids = dict(token_ids)
        self.img_context_id = token_ids["<IMG_CONTEXT>"]
        self.seg_token_id = token_ids["[SEG]"]
        self.eos_token_id = token_ids["<|im_end|>"]
        # The LLM's last layer runs only on the rows whose output is read (pg_train.model.arch.decoder);
        # False: on every row, the same values (the benchmark's `untrimmed` variant, the literal baseline).
        self.trim_last_layer = True
        # The dtype the student's forward is autocast to (Accelerate's mixed precision), for the
        # calls that bypass forward: the teacher's (pg_train.precision). None: compute as stored.
        self.autocast_dtype: torch.dtype | None = None
        self.vision_model = InternVisionModel(preset.vision)
        self.mlp1 = build_mlp1(preset.vision, preset.language.hidden_size)
        self.language_model = build_language_model(preset)
        # SAM2 cannot be constructed on the meta device (Hiera calls .item()); build_model moves it.
        with torch.device("cpu"):
            self.grounding_encoder = GroundingEncoder(preset.sam2)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(preset.language.hidden_size, preset.language.hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(preset.language.hidden_size, preset.sam2.d_model),
            nn.Dropout(0.0),
        )
        self.prompts = None
        if tokenizer is not None:
            self.set_prompts(template, chat_template or preset.template)

    def set_prompts(
        self, template: str, chat_template: str, stop_rule: str = "contains", caption_special_tokens: str = "text"
    ) -> None:
        """Build the prompts of a wording set and chat template (the checkpoint's by default),
        with a caption stop rule and a way to read special-token strings in captions
        (templates.PromptBuilder; docs/fidelity.md)."""
        self.prompts = PromptBuilder(
            self.tokenizer,
            self.token_ids,
            self.preset.vision.num_image_tokens,
            template,
            chat_template=chat_template,
            vocab_size=self.preset.language.vocab_size,
            stop_rule=stop_rule,
            caption_special_tokens=caption_special_tokens,
        )

    # ---- vision ---------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.preset.vision.grid_size

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 448, 448] -> projected image tokens [B, G*G, D_llm], row-major.

        The frozen ViT runs without building a graph; only mlp1 is differentiable.
        """
        frozen = not any(p.requires_grad for p in self.vision_model.parameters())
        if frozen:
            vit = self._frozen_vit(pixel_values)
        else:
            vit = self.vision_model(pixel_values)[:, 1:]  # drop CLS
        B, N, C = vit.shape
        side = math.isqrt(N)
        vit = pixel_shuffle_v2(vit.reshape(B, side, side, C), self.preset.vision.downsample_ratio)
        return self.mlp1(vit.reshape(B, -1, vit.shape[-1]).to(self.mlp1[0].weight.dtype))

    def _frozen_vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's output, reused when the same image tensor comes again.

        A step runs image 1 through the vision tower twice — for the teacher's generation and for
        pass 1 — and with a frozen tower (and an EMA teacher that shares it) only mlp1 differs
        between the two (the tower has no dropout, so train/eval mode does not change its
        output). One entry is kept, keyed by the tensor object and its in-place version
        and by the versions of the tower's weights, so a changed image or loaded weights miss.
        """
        key = (pixel_values._version, pixel_values.dtype, tuple(p._version for p in self.vision_model.parameters()))
        cached = getattr(self, "_vit_cache", None)
        if cached is not None and cached[0] is pixel_values and cached[1] == key:
            return cached[2]
        with torch.no_grad():
            vit = self.vision_model(pixel_values)[:, 1:]  # drop CLS
        self._vit_cache = (pixel_values, key, vit)
        return vit

    def clear_vision_cache(self) -> None:
        """Forget the reused ViT output (the literal baseline runs the tower for every use)."""
        self._vit_cache = None

    # ---- language -------------------------------------------------------------------------
    @property
    def special_id_mask(self) -> torch.Tensor:
        """Bool [V] of ids that must never appear in a caption: special and added tokens and
        lm_head rows beyond the tokenizer (computed once)."""
        if getattr(self, "_special_id_mask", None) is None:
            if self.tokenizer is None:
                raise ValueError("the objective needs the model's tokenizer to know its special ids")
            self._special_id_mask = special_id_mask(self.tokenizer, self.preset.language.vocab_size)
        return self._special_id_mask

    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def embed_with_images(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        region_cells: torch.Tensor | None,
        num_views: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every `<IMG_CONTEXT>` slot filled, in order: each sample's image
        tokens (G*G per view, its views in order), then (visual prompt) the tokens of the region's
        set cells, row-major, from the sample's last view — the thumbnail when tiled, as in the
        released model (`vp_overall_mask` marks the last view).

        input_ids [B, L]; image_features [sum(num_views), G*G, D]; region_cells [B, G, G] bool or
        None; num_views [B] (default: one view each). Raises if a row's number of slots differs
        from views*G*G + K: a silent mismatch would shift every image feature.
        """
        B = input_ids.shape[0]
        num_views = torch.ones(B, dtype=torch.long) if num_views is None else num_views.cpu().long()
        if int(num_views.sum()) != image_features.shape[0]:
            raise ValueError(f"{image_features.shape[0]} image views for num_views {num_views.tolist()}")
        slots = input_ids == self.img_context_id
        n_img = image_features.shape[1] * num_views.to(input_ids.device)
        cell_counts = (
            region_cells.flatten(1).sum(1)
            if region_cells is not None
            else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        )
        expected = n_img + cell_counts.to(input_ids.device)
        found = slots.sum(1)
        if not torch.equal(found, expected):
            bad = (found != expected).nonzero().flatten().tolist()
            raise ValueError(
                "<IMG_CONTEXT> slots do not match image tokens + region cells for samples "
                + ", ".join(f"{i}: {int(found[i])} slots, expected {int(n_img[i])}+{int(cell_counts[i])}" for i in bad)
            )
        fills = []
        ends = num_views.cumsum(0).tolist()
        for b in range(B):
            views = image_features[ends[b] - int(num_views[b]) : ends[b]]
            fills.append(views.reshape(-1, views.shape[-1]))
            if region_cells is not None:
                fills.append(views[-1][region_cells[b].flatten()])
        embeds = self.embed_tokens()(input_ids)
        embeds = embeds.clone()
        embeds[slots] = torch.cat(fills).to(embeds.dtype)
        return embeds

    def forward(self, mode: str = "lm", **kwargs):
        """One entry point for every student computation, so a wrapped model (DDP, DeepSpeed)
        sees each pass: calling submodules of the unwrapped model would skip gradient sync.

        mode "lm": teacher-forced language-model forward (`lm_forward`);
        "caption_logits": logits of selected rows only (`caption_logits`);
        "segment": [SEG] state -> SAM2 mask logits from caption embeddings (`segment_from_embeds`).
        """
        if mode == "lm":
            return self.lm_forward(**kwargs)
        if mode == "caption_logits":
            return self.caption_logits(**kwargs)
        if mode == "segment":
            return self.segment_from_embeds(**kwargs)
        raise ValueError(f"unknown forward mode {mode!r}; expected 'lm', 'caption_logits' or 'segment'")

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that skip padding anywhere in the row (left padding, or padded caption
        slots in the middle), so a padded sample sees the positions it would see alone."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def lm_forward(
        self, input_ids, attention_mask, pixel_values, region_cells=None, logits_to_keep=0, num_views=None, **kwargs
    ):
        """Teacher-forced forward of a tokenised prompt with its image (and optional region)."""
        embeds = self.embed_with_images(input_ids, self.extract_feature(pixel_values), region_cells, num_views)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def caption_logits(
        self, input_ids, attention_mask, pixel_values, region_cells, first_row: int, num_rows: int, num_views=None
    ) -> torch.Tensor:
        """Logits [B, num_rows, V] of rows first_row .. first_row+num_rows-1 only.

        lm_head runs on the selected hidden states: the [B, L, V] tensor of a full forward
        (L ~ 350, V = 151,679: 212 MB per sample in fp32) is never built.
        """
        embeds = self.embed_with_images(input_ids, self.extract_feature(pixel_values), region_cells, num_views)
        rows = slice(first_row, first_row + num_rows)
        hidden = decoder_hidden_states(
            self.language_model.model,
            embeds,
            attention_mask,
            self.position_ids(attention_mask),
            rows,
            trim=self.trim_last_layer,
        )
        # contiguous(): matmul will not fold a strided tensor that requires grad into one 2-D
        # GEMM; it broadcasts lm_head's [V, D] weight to a batch of B copies instead (measured
        # on CPU bf16, batch 8, V = 151,679, a strided row slice: a 5 GB copy, 24 s of a 26 s pass 1).
        return self.language_model.lm_head(hidden.contiguous())

    def segment_from_embeds(
        self,
        prefix_ids,
        caption_embeds,
        caption_mask,
        suffix_ids,
        seg_index: int,
        pixel_values,
        sam_pixel_values,
        return_seg_hidden: bool = False,
        prefix_mask=None,
        num_views=None,
    ):
        """Mask logits [B, S/4, S/4] for the prompt prefix + caption embeddings + suffix.

        prefix_ids [B, P] (with the image slots), caption_embeds [B, T, D], caption_mask [B, T]
        (0 = padded caption slot, excluded from attention), suffix_ids [B, Q] with the answer's
        [SEG] at suffix index `seg_index`. Only the LLM's final-norm hidden state is needed, so
        lm_head does not run at all. `return_seg_hidden`: also return the [SEG] state [B, D] (the
        supervised objective's request-summary loss reads it). `prefix_mask` [B, P]: 0 for the
        left padding of prefixes of different length (samples with different numbers of views).
        """
        B, P = prefix_ids.shape
        prefix = self.embed_with_images(prefix_ids, self.extract_feature(pixel_values), None, num_views)
        suffix = self.embed_tokens()(suffix_ids)
        embeds = torch.cat([prefix, caption_embeds.to(prefix.dtype), suffix], dim=1)
        prefix_mask = torch.ones_like(prefix_ids) if prefix_mask is None else prefix_mask.to(prefix_ids)
        attention_mask = torch.cat([prefix_mask, caption_mask.to(prefix_ids.dtype), torch.ones_like(suffix_ids)], dim=1)
        seg_row = P + caption_embeds.shape[1] + seg_index
        seg_hidden = decoder_hidden_states(
            self.language_model.model,
            embeds,
            attention_mask,
            self.position_ids(attention_mask),
            slice(seg_row, seg_row + 1),
            trim=self.trim_last_layer,
        )[:, 0]
        masks = self.predict_masks(seg_hidden, sam_pixel_values)
        return (masks, seg_hidden) if return_seg_hidden else masks

    # ---- state -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, except for a 4-bit LLM base: its NF4 storage and quantisation state are
        frozen and rebuilt identically with the model, so they are compared bitwise with the
        incoming tensors (any difference is an error) instead of loaded — torch's loader cannot
        load them into bitsandbytes parameters. Every other tensor loads strictly as usual."""
        if not getattr(self, "quantized_4bit", False):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        import bitsandbytes as bnb

        prefixes = tuple(f"{name}.weight" for name, m in self.named_modules() if isinstance(m, bnb.nn.Linear4bit))
        current = self.state_dict()
        rest = {}
        for key, value in state_dict.items():
            if key.startswith(prefixes):
                if key not in current or not torch.equal(current[key].cpu(), value.cpu()):
                    raise RuntimeError(
                        f"4-bit base tensor {key} differs from this model's: the checkpoint belongs to another base"
                    )
            else:
                rest[key] = value
        result = super().load_state_dict(rest, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}"
            )
        return type(result)(missing, result.unexpected_keys)

    # ---- grounding ------------------------------------------------------------------------
    def predict_masks(self, seg_hidden: torch.Tensor, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """[SEG] states [B, D_llm] + SAM2 images [B, 3, S, S] -> mask logits [B, S/4, S/4]."""
        language_embd = self.text_hidden_fcs(seg_hidden)
        return self.grounding_encoder(sam_pixel_values, language_embd)
