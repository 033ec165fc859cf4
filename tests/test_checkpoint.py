"""The released checkpoint format: round trip, sharding, and every way a checkpoint can be wrong."""

import json

import pytest
import torch
from conftest import make_batch, with_lora_weights
from safetensors.torch import load_file, save_file

from pg_train.model import CheckpointError, build_model, from_pretrained, save_pretrained, to_sa2va_state_dict
from pg_train.model.text.regions import region_cells
from pg_train.model.text.templates import left_pad
from pg_train.model.text.tokenizer import SpecialTokenError


def trained_tiny(seed=0):
    """A tiny model whose LoRA adapters are non-zero, so merging actually changes weights."""
    return with_lora_weights(build_model("tiny", seed=seed), seed=seed + 1).eval()


def outputs(model, seed=0):
    pixel_values, sam_pixel_values, masks = make_batch(model, seed=seed)
    cells, _ = region_cells(masks, model.grid_size)
    ids, attention = left_pad(
        [model.prompts.region_prompt(int(k)) for k in cells.flatten(1).sum(1)], model.tokenizer.pad_token_id
    )
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=attention,
            pixel_values=pixel_values,
            region_cells=cells,
            output_hidden_states=True,
        )
        seg = out.hidden_states[-1][:, -1]  # the last prompt row stands in for a [SEG] state
        mask_logits = model.predict_masks(seg, sam_pixel_values)
    return out.logits, mask_logits


@pytest.fixture
def saved(tmp_path):
    model = trained_tiny()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_gives_identical_outputs(saved, tmp_path):
    model, path = saved
    loaded = from_pretrained(path).eval()
    ref_logits, ref_masks = outputs(model)
    logits, masks = outputs(loaded)
    # LoRA merged (W + BA) vs applied (Wx + B(Ax)) differ only by float rounding.
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masks, ref_masks, rtol=1e-5, atol=1e-5)
    # Saving the loaded model again writes bitwise the same tensors.
    save_pretrained(loaded, tmp_path / "again")
    first, second = load_file(path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_merge_changes_lora_targets_only(saved):
    model, path = saved
    stored = load_file(path / "model.safetensors")
    base = model.language_model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(stored["language_model.model.layers.0.self_attn.q_proj.weight"], base)
    torch.testing.assert_close(stored["mlp1.1.weight"], model.mlp1[1].weight)
    assert not any("lora" in k for k in stored)
    assert any(k.endswith(".g_weight") for k in stored) and not any(k.endswith(".gamma") for k in stored)


def test_loaded_model_has_fresh_lora_and_same_trainable_set(saved):
    model, path = saved
    loaded = from_pretrained(path)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert all((p == 0).all() for n, p in loaded.named_parameters() if "lora_B" in n)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = trained_tiny()
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(outputs(from_pretrained(tmp_path).eval())[1], outputs(model)[1], rtol=1e-5, atol=1e-5)
    (tmp_path / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        from_pretrained(tmp_path)


def test_dtype_cast_on_load(tmp_path):
    model = trained_tiny()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["mlp1.1.weight"].dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.mlp1[1].weight.dtype == torch.float32
    torch.testing.assert_close(loaded.mlp1[1].weight, model.mlp1[1].weight.to(torch.bfloat16).float())


def _edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _, path = saved
    _edit_weights(path, lambda s: s.pop("text_hidden_fcs.2.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors:\s+text_hidden_fcs\.2\.bias \[32\]"):
        from_pretrained(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    _edit_weights(path, lambda s: s.update({"mllm.model.extra.weight": torch.zeros(3, 4)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors:\s+mllm\.model\.extra\.weight \[3, 4\]"):
        from_pretrained(path)


def test_wrong_shape_is_named(saved):
    _, path = saved
    _edit_weights(path, lambda s: s.update({"mlp1.1.weight": s["mlp1.1.weight"].t().contiguous()}))
    with pytest.raises(
        CheckpointError, match=r"wrong shape:\s+mlp1\.1\.weight: checkpoint \[128, 64\], model \[64, 128\]"
    ):
        from_pretrained(path)


def test_wrong_vocab_size_is_explained(saved):
    _, path = saved

    def grow(state):
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            state[key] = torch.cat([state[key], torch.zeros(5, state[key].shape[1])])

    _edit_weights(path, grow)
    with pytest.raises(
        CheckpointError, match=r"vocabulary size mismatch: config.json says 497.*embed_tokens.weight has 502 rows"
    ):
        from_pretrained(path)


def test_seg_token_that_does_not_encode_to_one_id_is_refused(saved):
    _, path = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (path / name).read_text()
        data = json.loads(text)
        if name == "tokenizer.json":
            data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[SEG]"]
        else:
            data["extra_special_tokens"] = [t for t in data.get("extra_special_tokens", []) if t != "[SEG]"]
        (path / name).write_text(json.dumps(data))
    with pytest.raises(SpecialTokenError, match=r"'\[SEG\]' encodes to \d+ ids"):
        from_pretrained(path)


def test_missing_files_are_named(tmp_path, saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere")


def test_state_dict_names_are_stable_on_meta():
    model = build_model("sa2va-4b", device="meta")
    state = to_sa2va_state_dict(model)
    assert state["language_model.model.layers.0.self_attn.q_proj.weight"].shape == (2048, 2048)
    assert state["grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"].shape == (256,)
