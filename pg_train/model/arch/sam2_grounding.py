"""SAM2 grounding encoder: sam2's own modules, wired the way Sa2VA uses them.

The frozen image encoder runs once per image; the trainable mask decoder turns the language
embedding of the [SEG] token into a mask. Names under `sam2_model.` are the original SAM2 names,
so checkpoints map by prefix (plus `gamma` <-> `g_weight`, see checkpoint.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .presets import Sam2Dims


def build_sam2(dims: Sam2Dims) -> nn.Module:
    """SAM2Base with the hiera layout of `dims` (sam2_hiera_l.yaml for the real preset).

    Plain constructors instead of hydra: hydra keeps global state that `import sam2` initialises,
    and the constructors make the tiny preset a matter of numbers.
    """
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.modeling.sam2_base import SAM2Base

    feat = dims.image_size // 16
    trunk = Hiera(
        embed_dim=dims.embed_dim,
        num_heads=dims.num_heads,
        stages=dims.stages,
        global_att_blocks=dims.global_att_blocks,
        window_pos_embed_bkg_spatial_size=dims.window_pos_embed_bkg_spatial_size,
        window_spec=dims.window_spec,
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=dims.d_model, normalize=True, scale=None, temperature=10000
        ),
        d_model=dims.d_model,
        backbone_channel_list=dims.backbone_channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )

    def rope_attention(kv_in_dim: int | None = None, **extra) -> nn.Module:
        return RoPEAttention(
            rope_theta=10000.0,
            feat_sizes=(feat, feat),
            embedding_dim=dims.d_model,
            num_heads=1,
            downsample_rate=1,
            dropout=0.1,
            kv_in_dim=kv_in_dim,
            **extra,
        )

    memory_attention = MemoryAttention(
        d_model=dims.d_model,
        pos_enc_at_input=True,
        layer=MemoryAttentionLayer(
            activation="relu",
            dim_feedforward=dims.memory_attention_ffn,
            dropout=0.1,
            pos_enc_at_attn=False,
            self_attention=rope_attention(),
            d_model=dims.d_model,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            cross_attention=rope_attention(kv_in_dim=dims.mem_dim, rope_k_repeat=True),
        ),
        num_layers=dims.memory_attention_layers,
    )
    memory_encoder = MemoryEncoder(
        out_dim=dims.mem_dim,
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=dims.mem_dim, normalize=True, scale=None, temperature=10000
        ),
        mask_downsampler=MaskDownSampler(embed_dim=dims.d_model, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(
            CXBlock(dim=dims.d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=dims.fuser_layers,
        ),
        in_dim=dims.d_model,
    )
    return SAM2Base(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1),
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        num_maskmem=dims.num_maskmem,
        image_size=dims.image_size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=False,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
    )


class GroundingEncoder(nn.Module):
    """Sa2VA's SAM2 path: frozen image encoder -> (language token) -> trainable mask decoder."""

    def __init__(self, dims: Sam2Dims):
        super().__init__()
        self.dims = dims
        self.sam2_model = build_sam2(dims)

    def get_sam2_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """images [B, 3, S, S] (ImageNet-normalised, S = dims.image_size) -> decoder inputs.

        Returns `image_embed` [B, C, S/16, S/16] with `no_mem_embed` added (a single frame has no
        memory) and `high_res_feats` [[B, C/8, S/4, S/4], [B, C/4, S/8, S/8]] projected by the
        decoder's conv_s0 / conv_s1 — those two convs belong to the trainable decoder, so they run
        outside the no-grad region of the frozen encoder.
        """
        sam = self.sam2_model
        encoder_frozen = not any(p.requires_grad for p in sam.image_encoder.parameters())
        grad_ctx = torch.no_grad() if encoder_frozen else contextlib.nullcontext()
        with grad_ctx:
            fpn = sam.image_encoder(images.to(sam.no_mem_embed.dtype))["backbone_fpn"]
        high_res = [sam.sam_mask_decoder.conv_s0(fpn[0]), sam.sam_mask_decoder.conv_s1(fpn[1])]
        image_embed = fpn[2] + sam.no_mem_embed.reshape(1, -1, 1, 1)
        return {"image_embed": image_embed, "high_res_feats": high_res}

    def inject_language_embd(self, sam_states: dict, language_embd: torch.Tensor) -> torch.Tensor:
        """language_embd [B, C] (one [SEG] per sample) -> mask logits [B, S/4, S/4].

        The prompt encoder sees no points (two not-a-point tokens: the empty point SAM2 inserts
        plus the padding point), the language embedding is a third sparse token; the decoder
        predicts 3 masks and the one with the best predicted IoU is kept.
        """
        sam = self.sam2_model
        pe_layer = sam.sam_prompt_encoder.pe_layer
        gaussian = pe_layer.positional_encoding_gaussian_matrix
        if gaussian.dtype == torch.float32:
            return self._decode(sam_states, language_embd)
        # sam2 computes point/grid coordinates in fp32 and multiplies them with this buffer; in a
        # bf16 model (DeepSpeed casts buffers too) the product fails, so it runs with an fp32 copy.
        pe_layer.positional_encoding_gaussian_matrix = gaussian.float()
        try:
            return self._decode(sam_states, language_embd)
        finally:
            pe_layer.positional_encoding_gaussian_matrix = gaussian

    def _decode(self, sam_states: dict, language_embd: torch.Tensor) -> torch.Tensor:
        sam = self.sam2_model
        B = language_embd.shape[0]
        # sam2's FPN upcasts its top-down levels to fp32; the decoder runs in its own dtype.
        dtype = sam.sam_mask_decoder.iou_token.weight.dtype
        image_embed = sam_states["image_embed"].to(dtype)
        high_res = [f.to(dtype) for f in sam_states["high_res_feats"]]
        if image_embed.shape[0] != B:
            raise ValueError(f"{image_embed.shape[0]} SAM2 images but {B} language embeddings")
        device = image_embed.device
        points = torch.zeros(B, 1, 2, device=device)
        labels = -torch.ones(B, 1, dtype=torch.int32, device=device)
        sparse, dense = sam.sam_prompt_encoder(points=(points, labels), boxes=None, masks=None)
        sparse = torch.cat([sparse.to(dtype), language_embd[:, None, :].to(dtype)], dim=1)
        masks, iou_pred, _, _ = sam.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=sam.sam_prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
            repeat_image=False,
            high_res_features=high_res,
        )
        best = iou_pred.argmax(dim=-1)
        return masks[torch.arange(B, device=device), best]

    def forward(self, images: torch.Tensor, language_embd: torch.Tensor) -> torch.Tensor:
        return self.inject_language_embd(self.get_sam2_embeddings(images), language_embd)
