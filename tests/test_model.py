"""Structure and behaviour of the Sa2VA model (tiny preset on CPU, real preset on meta)."""

import pytest
import torch
from conftest import DATA_DIR, make_batch

from pg_train.model import build_model, component_parameter_counts, to_sa2va_state_dict
from pg_train.model.arch.vision import pixel_shuffle_v2
from pg_train.model.decoding.generate import generate_from_embeds
from pg_train.model.text.regions import region_cells
from pg_train.model.text.templates import left_pad


def region_inputs(model, pixel_values, masks):
    cells, _ = region_cells(masks, model.grid_size)
    prompts = [model.prompts.region_prompt(int(k)) for k in cells.flatten(1).sum(1)]
    ids, attention = left_pad(prompts, model.tokenizer.pad_token_id)
    return ids, attention, cells


def test_meta_parameter_counts_match_released_sa2va_4b():
    model = build_model("sa2va-4b", device="meta")
    assert component_parameter_counts(model) == {
        "vision_model": 304_012_288,
        "mlp1": 12_595_200,
        "language_model": 3_396_050_944,
        "grounding_encoder": 224_430_130,
        "text_hidden_fcs": 4_720_896,
        "lora": 239_468_544,
    }
    assert model.language_model.lm_head.weight.shape == (151_679, 2048)
    assert model.language_model.lm_head.weight is not model.language_model.model.embed_tokens.weight


def test_meta_key_set_equals_released_checkpoint():
    model = build_model("sa2va-4b", device="meta")
    released = set((DATA_DIR / "sa2va_4b_state_dict_keys.txt").read_text().split())
    ours = set(to_sa2va_state_dict(model))
    assert len(released) == 1685
    assert sorted(ours - released) == [] and sorted(released - ours) == []


@pytest.mark.parametrize("preset", ["tiny", "sa2va-4b"])
def test_trainable_parts_are_exactly_lora_mlp1_fcs_and_mask_decoder(preset):
    model = build_model(preset, device="meta" if preset != "tiny" else "cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    for name in trainable:
        assert "lora_" in name or name.startswith(
            ("mlp1.", "text_hidden_fcs.", "grounding_encoder.sam2_model.sam_mask_decoder.")
        ), name
    assert any(n.startswith("grounding_encoder.sam2_model.sam_mask_decoder.conv_s0") for n in trainable)
    assert not any(n.startswith(("vision_model.", "grounding_encoder.sam2_model.image_encoder.")) for n in trainable)


def test_embed_and_lm_head_optionally_trainable():
    import dataclasses

    from pg_train.model.arch.presets import PRESETS

    lora = dataclasses.replace(PRESETS["tiny"].lora, train_embed_tokens=True, train_lm_head=True)
    model = build_model("tiny", lora=lora)
    assert model.language_model.model.embed_tokens.weight.requires_grad
    assert model.language_model.lm_head.weight.requires_grad


def test_pixel_shuffle_v2_layout():
    x = torch.randn(2, 8, 8, 3)
    out = pixel_shuffle_v2(x, 0.5)
    assert out.shape == (2, 4, 4, 12)
    for i, j in [(0, 0), (1, 2), (3, 3), (2, 1)]:
        expected = torch.cat(
            [x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], dim=-1
        )
        torch.testing.assert_close(out[:, i, j], expected, rtol=0, atol=0)


def test_shapes_of_every_stage(tiny_model):
    m = tiny_model
    pixel_values, sam_pixel_values, masks = make_batch(m)
    features = m.extract_feature(pixel_values)
    assert features.shape == (2, 256, m.preset.language.hidden_size)
    ids, attention, cells = region_inputs(m, pixel_values, masks)
    out = m(
        input_ids=ids,
        attention_mask=attention,
        pixel_values=pixel_values,
        region_cells=cells,
        output_hidden_states=True,
    )
    assert out.logits.shape == (2, ids.shape[1], m.preset.language.vocab_size)
    seg = out.hidden_states[-1][torch.arange(2), torch.tensor([5, 7])]
    assert seg.shape == (2, m.preset.language.hidden_size)
    masks_out = m.predict_masks(seg, sam_pixel_values)
    assert masks_out.shape == (2, m.preset.sam2.mask_logits_size, m.preset.sam2.mask_logits_size)


def test_region_tokens_fill_slots_in_row_major_order(tiny_model):
    m = tiny_model
    D = m.preset.language.hidden_size
    features = torch.arange(2 * 256, dtype=torch.float32).reshape(2, 256, 1).expand(2, 256, D).contiguous()
    cells = torch.zeros(2, 16, 16, dtype=torch.bool)
    cells[0, 3, 5] = cells[0, 3, 6] = cells[0, 10, 1] = True
    cells[1, 0, 15] = cells[1, 15, 0] = True
    prompts = [m.prompts.region_prompt(int(k)) for k in cells.flatten(1).sum(1)]
    ids, _ = left_pad(prompts, m.tokenizer.pad_token_id)
    embeds = m.embed_with_images(ids, features, cells)
    for b, expected_cells in enumerate([[3 * 16 + 5, 3 * 16 + 6, 10 * 16 + 1], [15, 15 * 16]]):
        slots = (ids[b] == m.img_context_id).nonzero().flatten()
        filled = embeds[b, slots, 0]
        assert filled[:256].tolist() == (b * 256 + torch.arange(256)).float().tolist()
        vp_start = (ids[b] == m.token_ids["<vp>"]).nonzero().item()
        vp_slots = slots[slots > vp_start]
        assert len(vp_slots) == len(expected_cells)
        assert embeds[b, vp_slots, 0].tolist() == [float(b * 256 + c) for c in expected_cells]


def test_slot_count_mismatch_is_an_error(tiny_model):
    m = tiny_model
    features = torch.randn(1, 256, m.preset.language.hidden_size)
    cells = torch.zeros(1, 16, 16, dtype=torch.bool)
    cells[0, 0, :3] = True
    ids, _ = left_pad([m.prompts.region_prompt(2)], m.tokenizer.pad_token_id)  # prompt says K=2, cells say 3
    with pytest.raises(ValueError, match="slots"):
        m.embed_with_images(ids, features, cells)


def test_region_cells_never_drop_a_small_region():
    masks = torch.zeros(2, 448, 448)
    masks[0, 100:110, 200:205] = 1  # far smaller than one 28x28 px cell
    masks[1, :112, :112] = 1
    cells, fallback = region_cells(masks, 16)
    assert fallback.tolist() == [True, False]
    assert cells[0].sum() == 1 and cells[0, 100 // 28, 200 // 28]
    assert cells[1].sum() == 16
    with pytest.raises(ValueError, match="select no grid cell"):
        region_cells(masks, 16, empty_policy="error")
    with pytest.raises(ValueError, match="empty"):
        region_cells(torch.zeros(1, 448, 448), 16)


def _caption(m, pixel_values, masks, max_new_tokens=12):
    ids, attention, cells = region_inputs(m, pixel_values, masks)
    embeds = m.embed_with_images(ids, m.extract_feature(pixel_values), cells)
    tokens, lengths = generate_from_embeds(
        m.language_model,
        embeds,
        attention,
        max_new_tokens=max_new_tokens,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.tokenizer.pad_token_id,
    )
    return ids, attention, cells, tokens, lengths


def test_teacher_forced_forward_reproduces_greedy_generation(tiny_model):
    m = tiny_model
    pixel_values, _, masks = make_batch(m)
    ids, attention, cells, tokens, lengths = _caption(m, pixel_values, masks)
    assert tokens.shape[1] > 0
    full = torch.cat([ids, tokens], dim=1)
    full_attention = torch.cat([attention, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        logits = m(input_ids=full, attention_mask=full_attention, pixel_values=pixel_values, region_cells=cells).logits
    P = ids.shape[1]
    # The row that predicts caption token t is P - 1 + t.
    predicted = logits[:, P - 1 : P - 1 + tokens.shape[1]].argmax(-1)
    for b in range(2):
        n = int(lengths[b])
        assert predicted[b, :n].tolist() == tokens[b, :n].tolist()


def test_batched_generation_equals_each_sample_alone(tiny_model):
    m = tiny_model
    pixel_values, _, masks = make_batch(m)
    _, _, cells, tokens, lengths = _caption(m, pixel_values, masks)
    assert cells[0].sum() != cells[1].sum(), "test needs different K per sample"
    for b in range(2):
        _, _, _, alone, alone_len = _caption(m, pixel_values[b : b + 1], masks[b : b + 1])
        assert alone_len.item() == lengths[b].item()
        assert alone[0, : alone_len.item()].tolist() == tokens[b, : lengths[b]].tolist()


def _generate(m, embeds, attention, allowed=None, **kwargs):
    vocab = m.preset.language.vocab_size
    suppress = None
    if allowed is not None:
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[allowed] = True
        suppress = (~keep).nonzero().flatten()
    return generate_from_embeds(
        m.language_model,
        embeds,
        attention,
        max_new_tokens=8,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.tokenizer.pad_token_id,
        suppress_token_ids=suppress,
        **kwargs,
    )


def test_generation_stops_at_eos_and_suppresses_ids(tiny_model):
    m = tiny_model
    pixel_values, _, masks = make_batch(m)
    ids, attention, cells = region_inputs(m, pixel_values, masks)
    embeds = m.embed_with_images(ids, m.extract_feature(pixel_values), cells)
    # Only eos allowed: every caption is empty (the stop token is not part of the caption).
    tokens, lengths = _generate(m, embeds, attention, allowed=[m.eos_token_id])
    assert lengths.tolist() == [0, 0] and tokens.shape[1] == 0
    # Suppressed ids never appear.
    suppressed = torch.tensor([m.eos_token_id, m.seg_token_id, m.img_context_id])
    tokens, lengths = generate_from_embeds(
        m.language_model,
        embeds,
        attention,
        max_new_tokens=8,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.tokenizer.pad_token_id,
        suppress_token_ids=suppressed,
    )
    assert lengths.tolist() == [8, 8]
    assert not torch.isin(tokens, suppressed).any()


def test_4bit_base_state_loads_only_into_the_same_base():
    model = build_model("tiny", seed=0, quantize_4bit=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    same = build_model("tiny", seed=0, quantize_4bit=True)
    with torch.no_grad():
        same.mlp1[1].weight.zero_()
    assert same.load_state_dict(state).missing_keys == []
    assert torch.equal(same.mlp1[1].weight, model.mlp1[1].weight)
    other = build_model("tiny", seed=1, quantize_4bit=True)
    with pytest.raises(RuntimeError, match="4-bit base tensor .* differs"):
        other.load_state_dict(state)
    del state["mlp1.1.weight"]
    with pytest.raises(RuntimeError, match="missing"):
        same.load_state_dict(state)


def test_frozen_vision_output_is_reused_for_the_same_image_only():
    """Teacher generation and pass 1 see the same image tensor: the frozen ViT runs once. A new
    tensor, an in-place change of the image, or changed tower weights must run it again."""
    model = build_model("tiny", seed=0)
    calls = []
    model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    image = torch.randn(2, 3, 448, 448)
    first = model.extract_feature(image)
    again = model.extract_feature(image)
    assert len(calls) == 1 and torch.equal(first, again)
    model.extract_feature(image.clone())
    assert len(calls) == 2
    image.mul_(0.5)  # same object, new content
    assert not torch.equal(model.extract_feature(image), first) and len(calls) == 3
    with torch.no_grad():
        next(model.vision_model.parameters()).add_(0.1)  # e.g. weights loaded in place
    model.extract_feature(image)
    assert len(calls) == 4
    model.vision_model.requires_grad_(True)  # a trainable tower is never cached (it needs its graph)
    model.extract_feature(image)
    model.extract_feature(image)
    assert len(calls) == 6


def test_unquantized_model_leaves_bitsandbytes_unimported_and_a_later_4bit_model_is_unchanged():
    """peft imports bitsandbytes at import and at LoRA injection (~1 s of CPU per process);
    build_model hides it while the model has no bitsandbytes layers. A 4-bit model built later in
    the same process must get the same modules as one built in a fresh process (peft's cached
    'is bitsandbytes available' answers cleared)."""
    import json
    import subprocess
    import sys

    describe = (
        "import json, sys\nfrom pg_train.model import build_model\n"
        "def layout(m): return sorted((n, type(x).__module__ + '.' + type(x).__name__) for n, x in m.named_modules())\n"
    )
    first = describe + (
        "plain = build_model('tiny', seed=0)\nloaded = 'bitsandbytes' in sys.modules\n"
        "q = build_model('tiny', seed=0, quantize_4bit=True)\n"
        "print(json.dumps([loaded, layout(plain), layout(q)]))"
    )
    fresh = describe + "print(json.dumps(layout(build_model('tiny', seed=0, quantize_4bit=True))))"
    run = lambda code: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=DATA_DIR.parent.parent, capture_output=True, text=True, timeout=120
    )
    a, b = run(first), run(fresh)
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    loaded, plain, later_4bit = json.loads(a.stdout.splitlines()[-1])
    assert not loaded
    assert any("lora" in kind for _, kind in plain)  # LoRA was injected
    fresh_4bit = json.loads(b.stdout.splitlines()[-1])
    assert any("bitsandbytes" in kind for _, kind in fresh_4bit)
    assert later_4bit == fresh_4bit
