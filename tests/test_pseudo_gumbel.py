"""The six steps of the Pseudo-Gumbel objective (SPEC §3), each property able to fail."""

import copy

import pytest
import torch
from conftest import make_batch, region_keys, with_lora_weights

from pg_train.bench.gumbel import naive_topk_gumbel_softmax
from pg_train.model import build_model
from pg_train.model.text.regions import region_cells
from pg_train.objectives.passes import forward_for_logits, special_ids
from pg_train.objectives.pseudo_gumbel import (
    pseudo_gumbel_step,
    random_mask_tokens,
    sample_generators,
    topk_gumbel_softmax,
    uniform_noise,
)
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


def make_step_batch(model, batch_size=2, seed=0):
    pixel_values, sam_pixel_values, masks = make_batch(model, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "pixel_values1": pixel_values,
        **region_keys(masks, model.grid_size),
        "pixel_values2": torch.randn(pixel_values.shape, generator=g),
        "sam_pixel_values2": sam_pixel_values,
        "masks2": masks.flip(-1),
        "sample_seeds": torch.arange(batch_size) + 1000 * seed,
    }


def test_teacher_forced_caption_logits_reproduce_teacher_greedy_caption():
    teacher = with_lora_weights(build_model("tiny", seed=0)).eval()
    student = teacher  # student == teacher
    batch = make_step_batch(teacher)
    cells, _ = region_cells(batch["region_masks1"], teacher.grid_size)
    assert cells[0].sum() != cells[1].sum()
    cfg = PseudoGumbelConfig(max_caption_len=12)
    captions, lengths = generate_pseudo_tokens_with_ema(teacher, batch["pixel_values1"], cells, cfg)
    # Cut the second caption short so the batch also differs in caption length (a caption is a
    # prefix of the greedy continuation; padding after it is masked out).
    lengths = torch.tensor([int(lengths[0]), 7])
    captions[1, 7:] = teacher.tokenizer.pad_token_id
    masked, replaced = random_mask_tokens(
        captions, lengths, 0.0, special_ids(teacher), sample_generators(torch.tensor([1, 2]), 0)
    )
    assert not replaced.any() and torch.equal(masked, captions)
    with torch.no_grad():
        logits = forward_for_logits(student, batch["pixel_values1"], cells, masked, lengths)
    assert logits.shape == (2, captions.shape[1], teacher.preset.language.vocab_size)
    # The teacher decodes with special ids suppressed; step 4 excludes the same ids.
    logits = logits.masked_fill(special_ids(teacher), float("-inf"))
    for b in range(2):
        n = int(lengths[b])
        assert logits[b, :n].argmax(-1).tolist() == captions[b, :n].tolist()


def test_teacher_forced_detects_the_seeds_off_by_one_slice():
    """The seed's slice (rows P .. P+T-1) does not reproduce the caption; ours (P-1 ..) does."""
    teacher = with_lora_weights(build_model("tiny", seed=0)).eval()
    batch = make_step_batch(teacher)
    cells, _ = region_cells(batch["region_masks1"], teacher.grid_size)
    captions, lengths = generate_pseudo_tokens_with_ema(
        teacher, batch["pixel_values1"], cells, PseudoGumbelConfig(max_caption_len=10)
    )
    with torch.no_grad():
        shifted = forward_for_logits(
            teacher, batch["pixel_values1"], cells, torch.cat([captions, captions[:, -1:]], 1), lengths + 1
        )
    assert shifted[:, 1:].argmax(-1).tolist() != captions.tolist()


def test_batch_invariance_of_loss_terms_and_text_embeds():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = copy.deepcopy(student).eval()
    batch = make_step_batch(student, batch_size=3, seed=2)
    cfg = PseudoGumbelConfig(max_caption_len=10, topk=32)
    together = pseudo_gumbel_step(student, teacher, batch, cfg)
    assert len(set(together.region_k.tolist())) > 1
    for b in range(3):
        alone = pseudo_gumbel_step(student, teacher, {k: v[b : b + 1] for k, v in batch.items()}, cfg)
        n = int(alone.caption_lengths[0])
        assert n == int(together.caption_lengths[b])
        assert torch.equal(alone.hard_ids[0, :n], together.hard_ids[b, :n])
        torch.testing.assert_close(alone.text_embeds[0, :n], together.text_embeds[b, :n], rtol=0, atol=0)
        torch.testing.assert_close(alone.bce[0], together.bce[b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.dice[0], together.dice[b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.mask_logits[0], together.mask_logits[b], rtol=1e-4, atol=1e-5)


def test_batch_invariance_with_padded_caption_slots():
    """Caption slots past a sample's length are masked out of pass 2 (forced short caption)."""
    student = with_lora_weights(build_model("tiny", seed=0))
    batch = make_step_batch(student, batch_size=2, seed=3)
    from pg_train.objectives.passes import forward_mask_with_text_embeds

    D = student.preset.language.hidden_size
    embeds = torch.randn(2, 9, D)
    lengths = torch.tensor([9, 4])
    with torch.no_grad():
        together = forward_mask_with_text_embeds(
            student, batch["pixel_values2"], batch["sam_pixel_values2"], embeds, lengths
        )
        garbage = embeds.clone()
        garbage[1, 4:] = 1e3  # whatever sits in padded slots must not matter
        with_garbage = forward_mask_with_text_embeds(
            student, batch["pixel_values2"], batch["sam_pixel_values2"], garbage, lengths
        )
        alone = forward_mask_with_text_embeds(
            student, batch["pixel_values2"][1:], batch["sam_pixel_values2"][1:], embeds[1:, :4], lengths[1:]
        )
    torch.testing.assert_close(with_garbage, together, rtol=0, atol=0)
    torch.testing.assert_close(alone[0], together[1], rtol=1e-4, atol=1e-5)


def test_gradient_flow_from_mask_loss_through_text_embeds():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=0)).eval()
    batch = make_step_batch(student)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16)
    out = pseudo_gumbel_step(student, teacher, batch, cfg)
    out.loss.backward()
    assert out.text_embeds.grad is not None and out.text_embeds.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in student.named_parameters()}
    for prefix in ("mlp1.", "text_hidden_fcs.", "grounding_encoder.sam2_model.sam_mask_decoder."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    for name, param in student.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        if not param.requires_grad:
            assert param.grad is None, name
    assert all(p.grad is None for p in teacher.parameters())

    # The pass-1 share of the gradient: what flows back from text_embeds alone into the first
    # pass must reach every LoRA layer and mlp1.
    student.zero_grad(set_to_none=True)
    out = pseudo_gumbel_step(student, teacher, batch, cfg)
    (grad_embeds,) = torch.autograd.grad(out.loss, out.text_embeds, retain_graph=True)
    names = [n for n, p in student.named_parameters() if "lora_" in n or n.startswith("mlp1.")]
    params = [dict(student.named_parameters())[n] for n in names]
    pass1 = torch.autograd.grad(out.text_embeds, params, grad_outputs=grad_embeds, allow_unused=True)
    for name, grad in zip(names, pass1):
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient from pass 1"


def test_straight_through_forward_is_exact_and_backward_matches_dense_reference():
    torch.manual_seed(0)
    B, T, V, D, k = 3, 7, 300, 24, 16
    special = torch.zeros(V, dtype=torch.bool)
    special[-20:] = True
    logits = (torch.randn(B, T, V) * 3).requires_grad_()
    weight = torch.randn(V, D).requires_grad_()
    uniform = uniform_noise(sample_generators(torch.tensor([1, 2, 3]), 1), T, k)
    upstream = torch.randn(B, T, D)

    embeds, hard = topk_gumbel_softmax(logits, weight, special, uniform, tau=0.7, topk=k, chunk_elems=5 * k * D)
    assert torch.equal(embeds, weight[hard])  # exactly the hard rows, not y_hard - y_soft + y_soft
    (embeds * upstream).sum().backward()
    grad_logits, grad_weight = logits.grad.clone(), weight.grad.clone()

    logits.grad = weight.grad = None
    ref_embeds, ref_hard = naive_topk_gumbel_softmax(logits, weight, special, uniform, 0.7, k)
    assert torch.equal(hard, ref_hard)
    (ref_embeds * upstream).sum().backward()
    for ours, ref in ((grad_logits, logits.grad), (grad_weight, weight.grad)):
        assert ref.abs().sum() > 0
        rel = (ours - ref).norm() / ref.norm()
        assert rel <= 1e-5, rel


def test_straight_through_backward_keeps_no_dense_gather():
    """What autograd saves for backward is O(B*T*k), never the [B, T, k, D] gather."""
    B, T, V, D, k = 2, 5, 200, 64, 32
    logits = torch.randn(B, T, V, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    uniform = uniform_noise(sample_generators(torch.tensor([1, 2]), 1), T, k)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_gumbel_softmax(logits, weight, torch.zeros(V, dtype=torch.bool), uniform, topk=k)
    dense = B * T * k * D
    assert max(n for n in saved if n != V * D) < dense / 8, saved


def test_special_tokens_never_enter_captions_masking_or_gumbel_over_many_seeds():
    model = build_model("tiny", seed=0).eval()
    special = special_ids(model)
    V = special.numel()
    replaced_total, real_total = 0, 0
    for seed in range(40):
        captions = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(seed))
        lengths = torch.tensor([32, 20, 5, 0])
        captions[torch.arange(32)[None] >= lengths[:, None]] = model.tokenizer.pad_token_id
        masked, replaced = random_mask_tokens(
            captions, lengths, 0.25, special, sample_generators(torch.arange(4) + 10 * seed, 0)
        )
        real = torch.arange(32)[None] < lengths[:, None]
        assert not special[masked[real]].any()
        assert torch.equal(masked[~real], captions[~real])  # padding untouched
        assert not replaced[~real].any()
        replaced_total += int(replaced.sum())
        real_total += int(real.sum())
        logits = torch.randn(4, 32, V, generator=torch.Generator().manual_seed(seed)) * 5
        logits[..., special] += 100  # specials are the most likely ids: still never picked
        _, hard = topk_gumbel_softmax(
            logits,
            torch.randn(V, 8),
            special,
            uniform_noise(sample_generators(torch.arange(4) + seed, 1), 32, 64),
            topk=64,
        )
        assert not special[hard].any()
    assert abs(replaced_total / real_total - 0.25) < 0.02, replaced_total / real_total

    # Teacher captions: even a teacher that prefers special ids never emits them.
    with torch.no_grad():
        model.language_model.lm_head.weight[special] += 10 * model.language_model.lm_head.weight.abs().max()
    batch = make_step_batch(model)
    cells, _ = region_cells(batch["region_masks1"], model.grid_size)
    for do_sample in (False, True):
        cfg = PseudoGumbelConfig(max_caption_len=16, do_sample=do_sample)
        captions, lengths = generate_pseudo_tokens_with_ema(
            model, batch["pixel_values1"], cells, cfg, torch.Generator().manual_seed(0)
        )
        real = torch.arange(captions.shape[1])[None] < lengths[:, None]
        assert real.any() and not special[captions[real]].any()


def test_k_policy_tiny_and_empty_masks_and_prompt_k_equals_cells():
    model = build_model("tiny", seed=0).eval()
    masks = torch.zeros(3, 448, 448)
    masks[0, 5:8, 5:8] = 1  # a few pixels: covers no cell by half
    masks[1, 0:56, 0:84] = 1  # exactly 2x3 cells
    masks[2, 100:300, 50:140] = 1
    cells, fallback = region_cells(masks, 16)
    assert fallback.tolist() == [True, False, False]
    assert cells.flatten(1).sum(1).tolist()[:2] == [1, 6]
    batch = {
        "pixel_values1": torch.randn(3, 3, 448, 448),
        **region_keys(masks),
        "pixel_values2": torch.randn(3, 3, 448, 448),
        "sam_pixel_values2": torch.randn(3, 3, 128, 128),
        "masks2": masks,
        "sample_seeds": torch.arange(3),
    }
    with torch.no_grad():
        out = pseudo_gumbel_step(model, model, batch, PseudoGumbelConfig(max_caption_len=4))
    assert out.region_k.tolist() == cells.flatten(1).sum(1).tolist()
    assert out.region_fallback.tolist() == [True, False, False] and int(out.metrics["region_fallbacks"]) == 1
    for b in range(3):
        prompt = model.prompts.region_prompt(int(out.region_k[b]))
        vp_start, vp_end = prompt.index(model.token_ids["<vp>"]), prompt.index(model.token_ids["</vp>"])
        assert vp_end - vp_start - 1 == int(cells[b].sum())
    # the official behaviour: the region vanishes (`region1<vp></vp>`), counted the same way
    with torch.no_grad():
        official = pseudo_gumbel_step(
            model, model, batch, PseudoGumbelConfig(max_caption_len=4, empty_region_policy="official")
        )
    assert official.region_k.tolist() == [0, *out.region_k.tolist()[1:]]
    assert official.region_fallback.tolist() == [True, False, False] and int(official.metrics["region_fallbacks"]) == 1
    assert torch.isfinite(official.loss) and official.caption_lengths[0] >= 1
    empty_prompt = model.prompts.region_prompt(0)
    assert empty_prompt.index(model.token_ids["</vp>"]) == empty_prompt.index(model.token_ids["<vp>"]) + 1
    with pytest.raises(ValueError, match="select no grid cell"):
        pseudo_gumbel_step(model, model, batch, PseudoGumbelConfig(max_caption_len=4, empty_region_policy="error"))
    batch.update(region_keys(torch.zeros_like(masks)))
    with pytest.raises(ValueError, match="empty"):
        pseudo_gumbel_step(model, model, batch, PseudoGumbelConfig(max_caption_len=4))


def test_loss_weights_and_resolution():
    from pg_train.objectives.passes import mask_loss, resize_target

    target = torch.zeros(1, 128, 128)
    target[:, :64] = 1
    small = resize_target(target, (32, 32))
    assert small.shape == (1, 32, 32) and small[0, :16].eq(1).all() and small[0, 16:].eq(0).all()
    perfect = torch.where(small > 0.5, 20.0, -20.0)
    assert mask_loss(perfect, small)["loss"] < 1e-3
    losses = mask_loss(torch.zeros(1, 32, 32), small, bce_weight=2.0, dice_weight=0.5)
    torch.testing.assert_close(losses["loss"], 2.0 * losses["bce"][0] + 0.5 * losses["dice"][0])
    torch.testing.assert_close(losses["bce"][0], torch.log(torch.tensor(2.0)))


def _step_grads(student, teacher, batch, cfg):
    out = pseudo_gumbel_step(student, teacher, batch, cfg)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from pg_train.model import enable_gradient_checkpointing

    student = with_lora_weights(build_model("tiny", seed=0)).train()
    teacher = copy.deepcopy(student).eval()
    batch = make_step_batch(student)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16)
    loss, grads = _step_grads(student, teacher, batch, cfg)
    enable_gradient_checkpointing(student)
    assert student.language_model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = _step_grads(student, teacher, batch, cfg)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_autocast_step_is_finite_and_keeps_fp32_noise():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = copy.deepcopy(student).eval()
    batch = make_step_batch(student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pseudo_gumbel_step(student, teacher, batch, PseudoGumbelConfig(max_caption_len=8, topk=16))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert out.text_embeds.grad.abs().sum() > 0


def test_bf16_weights_step_runs_with_bf16_embeds_and_finite_grads():
    """DeepSpeed bf16 casts the whole model (buffers included); the step must still run."""
    student = with_lora_weights(build_model("tiny", seed=0, dtype=torch.bfloat16))
    teacher = copy.deepcopy(student).eval()
    batch = {k: v.bfloat16() if v.is_floating_point() else v for k, v in make_step_batch(student).items()}
    out = pseudo_gumbel_step(student, teacher, batch, PseudoGumbelConfig(max_caption_len=8, topk=16))
    out.loss.backward()
    assert out.text_embeds.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert out.text_embeds.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_mask_iou_of_empty_prediction_against_a_tiny_object_is_zero():
    from pg_train.objectives.passes import mask_iou

    target = torch.zeros(2, 8, 8)
    target[0, 3, 3] = 0.2  # smaller than half a pixel at this resolution
    target[1, 2:6, 2:6] = 1.0
    empty = torch.full((2, 8, 8), -5.0)
    assert mask_iou(empty, target).tolist() == [0.0, 0.0]
    hit = empty.clone()
    hit[0, 3, 3] = 5.0
    hit[1, 2:6, 2:4] = 5.0
    assert mask_iou(hit, target).tolist() == [1.0, 0.5]


def test_the_frozen_vit_runs_once_per_step_when_image_2_is_image_1():
    from pg_train.ema import EMATeacher
    from pg_train.memcheck.measure import build_batch

    torch.manual_seed(0)
    student = build_model("tiny", seed=0)
    teacher = EMATeacher(student, placement="same")
    cfg = PseudoGumbelConfig(max_caption_len=4, min_caption_len=4, topk=8)
    calls = []
    student.vision_model.register_forward_hook(lambda *_: calls.append(1))
    for pairing, expected in (("same", 1), ("augment", 2)):
        batch = build_batch(student, 2, torch.device("cpu"), seed=5, pairing=pairing)
        calls.clear()
        pseudo_gumbel_step(student, teacher, batch, cfg).loss.backward()
        assert len(calls) == expected, pairing
