"""Our InternViT + pixel shuffle + mlp1 against transformers' native InternVL implementation.

transformers ships InternVL (`InternVLVisionModel`, `InternVLModel.pixel_shuffle`,
`InternVLMultiModalProjector`) written independently of this project and of the original
InternViT names: the weights are copied through the name map a released checkpoint would need
(fused `qkv` split into q/k/v, `ls1`/`ls2` -> `lambda_1`/`lambda_2`, ...) and the outputs compared.
"""

import math

import pytest
import torch
from transformers.models.internvl.configuration_internvl import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import (
    InternVLModel,
    InternVLMultiModalProjector,
    InternVLVisionModel,
)

from pg_train.model import build_model


def native_vision_config(dims) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        intermediate_size=dims.mlp_size,
        attention_bias=dims.qkv_bias,
        use_qk_norm=False,
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_norm_eps=dims.layer_norm_eps,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )


def native_state_dict(vision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternViT names (as released in Sa2VA) -> transformers' InternVLVisionModel names."""
    out = {
        "embeddings.cls_token": vision_state["embeddings.class_embedding"],
        "embeddings.position_embeddings": vision_state["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": vision_state["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": vision_state["embeddings.patch_embedding.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"encoder.layer.{n}."
        for kind in ("weight", "bias"):
            q, k, v = vision_state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out |= {
                f"{dst}attention.q_proj.{kind}": q,
                f"{dst}attention.k_proj.{kind}": k,
                f"{dst}attention.v_proj.{kind}": v,
            }
            out[f"{dst}attention.projection_layer.{kind}"] = vision_state[f"{src}attn.proj.{kind}"]
            out[f"{dst}layernorm_before.{kind}"] = vision_state[f"{src}norm1.{kind}"]
            out[f"{dst}layernorm_after.{kind}"] = vision_state[f"{src}norm2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = vision_state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = vision_state[f"{src}mlp.fc2.{kind}"]
        out[f"{dst}lambda_1"] = vision_state[f"{src}ls1"]
        out[f"{dst}lambda_2"] = vision_state[f"{src}ls2"]
    return out


@pytest.fixture(scope="module")
def ours():
    model = build_model("tiny", seed=0, lora=False).eval()
    with torch.no_grad():  # layer scales away from their constant init, so a swapped ls1/ls2 shows
        for layer in model.vision_model.encoder.layers:
            layer.ls1.uniform_(0.05, 0.5)
            layer.ls2.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def native(ours):
    dims = ours.preset.vision
    vision = InternVLVisionModel(native_vision_config(dims)).eval()
    vision.load_state_dict(native_state_dict(ours.vision_model.state_dict()), strict=True)
    config = InternVLConfig(
        vision_config=native_vision_config(dims).to_dict(),
        text_config={"model_type": "qwen2", "hidden_size": ours.preset.language.hidden_size},
        downsample_ratio=dims.downsample_ratio,
        projector_hidden_act="gelu",
    )
    projector = InternVLMultiModalProjector(config).eval()
    mlp1 = ours.mlp1.state_dict()
    projector.load_state_dict(
        {
            "layer_norm.weight": mlp1["0.weight"],
            "layer_norm.bias": mlp1["0.bias"],
            "linear_1.weight": mlp1["1.weight"],
            "linear_1.bias": mlp1["1.bias"],
            "linear_2.weight": mlp1["3.weight"],
            "linear_2.bias": mlp1["3.bias"],
        },
        strict=True,
    )
    return vision, projector


def test_native_internvl_vision_tower_equals_ours(ours, native):
    vision, _ = native
    pixels = torch.randn(
        3, 3, ours.preset.vision.image_size, ours.preset.vision.image_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = vision(pixel_values=pixels).last_hidden_state
        got = ours.vision_model(pixels)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_native_internvl_pixel_shuffle_and_projector_equal_ours(ours, native):
    vision, projector = native
    dims = ours.preset.vision
    pixels = torch.randn(2, 3, dims.image_size, dims.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = vision(pixel_values=pixels).last_hidden_state[:, 1:]  # "default": drop CLS
        side = math.isqrt(features.shape[1])
        shuffled = InternVLModel.pixel_shuffle(
            None, features.reshape(2, side, side, -1), scale_factor=dims.downsample_ratio
        )
        expected = projector(shuffled.reshape(2, -1, shuffled.shape[-1]))
        got = ours.extract_feature(pixels)
    assert got.shape == (2, dims.num_image_tokens, ours.preset.language.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
