"""Evaluation: RefCOCO-style metrics, the caption controls, and the gallery."""

import pytest
import torch
from conftest import with_lora_weights
from PIL import Image

from pg_train.evaluate import ciou_giou, evaluate, heldout_batches
from pg_train.gallery import TEXT_HEIGHT, TILE
from pg_train.inference import caption_inputs
from pg_train.model import build_model
from pg_train.objectives.passes import forward_mask_with_text_embeds, iou_counts
from pg_train.objectives.settings import PseudoGumbelConfig


def lively(seed=0):
    return with_lora_weights(build_model("tiny", seed=seed), seed=seed + 1, scale=0.2).eval()


def test_metrics_ciou_and_giou_on_hand_made_masks():
    target = torch.zeros(3, 4, 4)
    target[0, :2, :2] = 1  # 4 px
    target[1, :, :1] = 1  # 4 px
    target[2, :, :] = 1  # 16 px
    logits = torch.full((3, 4, 4), -1.0)
    logits[0, :1, :2] = 1  # 2 of the 4 px, nothing else -> I 2, U 4
    logits[1, :, 3] = 1  # disjoint -> I 0, U 8
    logits[2, :, :3] = 1  # 12 of 16 -> I 12, U 16
    inter, union = iou_counts(logits, target)
    assert inter.tolist() == [2, 0, 12] and union.tolist() == [4, 8, 16]
    numbers = ciou_giou(inter, union)
    assert numbers["cIoU"] == pytest.approx(14 / 28)
    assert numbers["gIoU"] == pytest.approx((0.5 + 0.0 + 0.75) / 3)


def test_controls_change_the_caption_input_and_the_prediction():
    model = lively()
    cfg = PseudoGumbelConfig(max_caption_len=8)
    (batch,) = heldout_batches(model, samples=3, batch_size=3, seed=5, device="cpu")
    inputs = caption_inputs(model, batch, cfg)
    cycle_ids, cycle_len = inputs["cycle"]
    shuffled_ids, shuffled_len = inputs["shuffled"]
    assert torch.equal(shuffled_ids, cycle_ids[[2, 0, 1]]) and torch.equal(shuffled_len, cycle_len[[2, 0, 1]])
    assert inputs["empty"][1].tolist() == [0, 0, 0]
    truth_ids, truth_len = inputs["referring"]
    decoded = model.tokenizer.decode(truth_ids[0, : truth_len[0]].tolist())
    assert truth_len[0] == 8 and decoded and batch["captions"][0].startswith(decoded)  # cut at max_caption_len
    with torch.no_grad():
        masks = {
            kind: forward_mask_with_text_embeds(
                model, batch["pixel_values2"], batch["sam_pixel_values2"], model.embed_tokens()(ids), lens
            )
            for kind, (ids, lens) in inputs.items()
        }
    assert not torch.allclose(masks["cycle"], masks["empty"])
    assert not torch.allclose(masks["cycle"], masks["referring"])
    if not torch.equal(cycle_ids, shuffled_ids):
        assert not torch.allclose(masks["cycle"], masks["shuffled"])


def test_gallery_png_is_written_with_the_expected_size(tmp_path):
    model = lively()
    batches = heldout_batches(model, samples=4, batch_size=2, seed=7, device="cpu")
    results = evaluate(
        model, batches, PseudoGumbelConfig(max_caption_len=6), gallery_path=tmp_path / "gallery.png", gallery_size=3
    )
    with Image.open(tmp_path / "gallery.png") as image:
        assert image.size == (2 * TILE, 3 * (TILE + TEXT_HEIGHT))
    assert results["samples"] == 4
    for kind in ("referring", "cycle", "shuffled", "empty"):
        assert 0.0 <= results[kind]["cIoU"] <= 1.0 and 0.0 <= results[kind]["gIoU"] <= 1.0
    assert 0 < results["captions"]["mean_length"] <= 6 and model.training is False


def test_evaluate_cli_on_a_training_checkpoint(tmp_path):
    from pg_train.config import load_config
    from pg_train.evaluate import main as evaluate_main
    from pg_train.train import train

    train(
        load_config(
            [],
            [
                f"output_dir={tmp_path / 'run'}",
                "max_steps=1",
                "objective_kind=supervised",
                "tensorboard=false",
                "progress=false",
                "objective.max_caption_len=6",
                "data.num_samples=8",
            ],
        )
    )
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(tmp_path / "run" / "checkpoints" / "step-00000001"),
                "--samples",
                "4",
                "--batch-size",
                "2",
                "--output",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert (tmp_path / "eval" / "eval.json").is_file() and (tmp_path / "eval" / "gallery.png").is_file()


def test_controls_caption_sensitivity_is_zero_when_the_seg_state_ignores_the_caption():
    """The diagnostic behind 'masks ignore the caption': with the LLM's [SEG] state replaced by a
    function of the image alone, the caption effect is exactly 0; with the real path it is not."""
    model = lively()
    batches = heldout_batches(model, samples=4, batch_size=4, seed=9, device="cpu")
    cfg = PseudoGumbelConfig(max_caption_len=6)
    real = evaluate(model, batches, cfg)["language_embedding"]
    assert real["caption_effect"] > 0 and real["image_spread"] > 0 and real["ratio"] > 0.01

    original = model.segment_from_embeds

    def caption_blind(caption_embeds, caption_mask, **kwargs):
        return original(
            caption_embeds=torch.zeros_like(caption_embeds), caption_mask=torch.ones_like(caption_mask), **kwargs
        )

    model.segment_from_embeds = caption_blind
    blind = evaluate(model, batches, cfg)
    assert blind["language_embedding"]["caption_effect"] == 0.0 and blind["language_embedding"]["image_spread"] > 0
    assert blind["cycle"] == blind["shuffled"]  # identical masks: the controls expose it too


def test_controls_request_summary_loss_reads_the_caption_at_the_seg_state():
    """The supervised objective's request-summary term: lm_head at [SEG] scored against the
    caption's words. Hand-made: a state whose logits put all mass on the caption's tokens scores
    ~0; the gradient reaches the caption embeddings through [SEG]."""
    from pg_train.objectives.passes import tokenize_captions
    from pg_train.objectives.supervised import request_summary_loss

    model = lively()
    ids, lens = torch.tensor([[30, 31, 32], [40, 0, 0]]), torch.tensor([3, 1])
    head = model.language_model.lm_head
    with torch.no_grad():
        head.weight.zero_()
        head.weight[ids[1, 0]] = 1.0
    state = torch.zeros(2, head.in_features)
    state[1] = 50.0
    loss = request_summary_loss(model, state, ids, lens)
    assert loss[1] < 1e-3 and loss[0] > 1.0  # sample 1 puts its mass on its only word, sample 0 spreads it
    assert request_summary_loss(model, state, ids, torch.tensor([0, 1]))[0] == 0  # empty caption: no loss

    model = lively()
    (batch,) = heldout_batches(model, samples=2, batch_size=2, seed=3, device="cpu")
    cfg = PseudoGumbelConfig(max_caption_len=6)
    ids, lens = tokenize_captions(model, batch["captions"], cfg.max_caption_len)
    embeds = model.embed_tokens()(ids).detach().requires_grad_()
    _, seg_hidden = forward_mask_with_text_embeds(
        model, batch["pixel_values2"], batch["sam_pixel_values2"], embeds, lens, return_seg_hidden=True
    )
    request_summary_loss(model, seg_hidden, ids, lens).sum().backward()
    assert embeds.grad is not None and embeds.grad[0, : lens[0]].abs().sum() > 0


def test_heldout_scenes_do_not_follow_the_training_sample_offset():
    """A run trained on scenes [k, k + n) (data.sample_offset) is evaluated on the same held-out
    set as every other run: the held-out seed's first scenes."""
    from pg_train.data import DataConfig
    from pg_train.evaluate import heldout_batches
    from pg_train.model import build_offline

    model = build_offline("tiny-112", device="cpu", seed=0)
    base = heldout_batches(model, 4, 2, seed=10_000, device="cpu", data=DataConfig(image_size=128))
    shifted = heldout_batches(model, 4, 2, seed=10_000, device="cpu", data=DataConfig(image_size=128, sample_offset=50))
    assert all(torch.equal(a["pixel_values1"], b["pixel_values1"]) for a, b in zip(base, shifted))


def test_inference_on_images_gives_the_evaluation_path_s_masks(tmp_path):
    """pg_train.inference's image-level calls (what predict uses) and the evaluation's batch path
    agree: the same image and text through a manifest pair (image 2 = image 1) give the same
    referring logits, and the cycle's caption is the evaluation's."""
    import numpy as np

    from pg_train import inference
    from pg_train.data import ManifestPairs, PairDataset, collate_pairs
    from pg_train.data.loader import preprocess_for
    from pg_train.inference import inputs_on_device, segment_image2

    model = lively()
    cfg = PseudoGumbelConfig(max_caption_len=6)
    from formats import write_pairs

    manifest, _ = write_pairs(tmp_path / "pairs", count=3, bad_row=-1)
    pairs = PairDataset(ManifestPairs(manifest), preprocess_for(model.preset))
    batch = inputs_on_device(collate_pairs([pairs[0], pairs[2]]), "cpu", torch.float32)
    inputs = caption_inputs(model, batch, cfg)
    referring = segment_image2(model, batch, *inputs["referring"])
    images = [Image.open(tmp_path / "pairs" / f"img{i}.png").convert("RGB") for i in (0, 2)]
    regions = [np.asarray(Image.open(tmp_path / "pairs" / f"img{i}_mask.png")) > 0 for i in (0, 2)]
    predictions = inference.segment(model, images, batch["captions"], cfg)
    for b, p in enumerate(predictions):
        assert torch.equal(p.logits, referring[b].float())
        assert p.mask.shape == (images[b].height, images[b].width) and p.caption == batch["captions"][b]
        assert np.array_equal(p.mask, inference.mask_at(referring[b], p.mask.shape).numpy())
        assert 0.0 <= p.score <= 1.0
    own = inference.segment_from_own_caption(model, images, regions, cfg)
    assert [p.caption for p in own] == inference.decode(model, *inputs["cycle"])
    assert inference.caption(model, images, regions, cfg) == [p.caption for p in own]
    assert model.training is False
