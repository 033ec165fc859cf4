"""InternVL dynamic tiling, against the algorithm InternVL documents (its `dynamic_preprocess`,
written out below as the reference), and the model reading tiled images end to end."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pg_train.data.loader import PairDataset, collate_pairs, preprocess_for
from pg_train.data.tiling import Tiling
from pg_train.data.types import RawPair


def internvl_layout(width, height, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """InternVL's dynamic_preprocess layout, transcribed from its documented code: returns the
    number of views and the (cols, rows) grid."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    blocks = best_ratio[0] * best_ratio[1]
    return blocks + (1 if use_thumbnail and blocks != 1 else 0), best_ratio


SIZES = [
    (640, 480),
    (480, 640),
    (1024, 1024),
    (448, 448),
    (300, 200),
    (1920, 1080),
    (100, 1000),
    (4000, 500),
    (800, 799),
    (1, 1),
]


@pytest.mark.parametrize("max_num", [12, 6, 1])
@pytest.mark.parametrize("size", SIZES)
def test_tiling_grid_and_view_count_equal_internvl(size, max_num):
    tiling = Tiling(448, dynamic=True, min_num=1, max_num=max_num, use_thumbnail=True)
    views, grid = internvl_layout(*size, max_num=max_num)
    assert tiling.grid(*size) == grid
    assert tiling.num_views(*size) == views


def test_tiling_token_count_of_a_640x480_image_on_sa2va_4b():
    """The issue's figure, not ours: 13 views, 3,328 image tokens."""
    from pg_train.model.arch.presets import PRESETS

    preprocess = preprocess_for(PRESETS["sa2va-4b"])
    views = preprocess.tiling.num_views(640, 480)
    assert views == 13 and views * PRESETS["sa2va-4b"].vision.num_image_tokens == 3328


def test_tiling_views_are_the_resized_image_cut_row_major_then_the_thumbnail():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 700, 3), dtype=np.uint8))
    tiling = Tiling(64, dynamic=True, max_num=6, use_thumbnail=True)
    cols, rows = tiling.grid(700, 300)
    views = tiling.views(image)
    assert len(views) == cols * rows + 1
    resized = np.asarray(image.resize((64 * cols, 64 * rows), Image.BICUBIC))
    for index, view in enumerate(views[:-1]):
        r, c = divmod(index, cols)
        assert np.array_equal(np.asarray(view), resized[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64])
    assert np.array_equal(np.asarray(views[-1]), np.asarray(image.resize((64, 64), Image.BICUBIC)))
    # One tile: no thumbnail, and tiling off is always one view.
    assert len(Tiling(64, dynamic=True).views(image.resize((64, 64)))) == 1
    assert len(Tiling(64, dynamic=False).views(image)) == 1


def test_tiling_off_for_tiny_presets_and_read_from_a_checkpoint_config(tmp_path):
    import json

    from pg_train.model import build_model
    from pg_train.model.arch.presets import PRESETS
    from pg_train.model.io.checkpoint import from_pretrained, save_pretrained

    assert not preprocess_for(PRESETS["tiny"]).tiling.dynamic
    save_pretrained(build_model("tiny", seed=0, lora=False), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.update(dynamic_image_size=True, min_dynamic_patch=1, max_dynamic_patch=4, use_thumbnail=True)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    tiling = preprocess_for(from_pretrained(tmp_path / "ckpt", lora=False).preset).tiling
    assert (tiling.dynamic, tiling.min_num, tiling.max_num, tiling.use_thumbnail) == (True, 1, 4, True)


def test_tiling_region_tokens_come_from_the_last_view(tiny_model):
    """View v's features are all v: the image slots hold views 0..n-1 in order, the region slots
    read the last view (the thumbnail)."""
    m = tiny_model
    G2, D = m.preset.vision.num_image_tokens, m.preset.language.hidden_size
    num_views = torch.tensor([3, 1])
    features = torch.cat([torch.full((1, G2, D), float(v)) for v in (0, 1, 2, 7)])
    cells = torch.zeros(2, m.grid_size, m.grid_size, dtype=torch.bool)
    cells[0, 1, 2] = cells[0, 3, 3] = True
    cells[1, 0, 0] = True
    from pg_train.objectives.passes import region_prompts

    ids, _ = region_prompts(m, cells, num_views)
    embeds = m.embed_with_images(ids, features, cells, num_views)
    slots = ids == m.img_context_id
    sample0 = embeds[0][slots[0]][:, 0].tolist()
    assert sample0 == [0.0] * G2 + [1.0] * G2 + [2.0] * G2 + [2.0, 2.0]
    assert embeds[1][slots[1]][:, 0].tolist() == [7.0] * G2 + [7.0]


class Pairs:
    """Two image pairs of different aspect ratios (different numbers of views)."""

    def __init__(self):
        rng = np.random.default_rng(1)
        self.items = []
        for h, w in ((120, 400), (200, 200)):
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            mask = np.zeros((h, w), dtype=bool)
            mask[h // 4 : h // 2, w // 3 : w // 2] = True
            self.items.append(
                RawPair(
                    image,
                    mask,
                    image.transpose(Image.FLIP_LEFT_RIGHT),
                    mask[:, ::-1].copy(),
                    "a thing",
                    f"pair {len(self.items)}",
                )
            )

    def __len__(self):
        return len(self.items)

    def load(self, index):
        return self.items[index]


def test_tiling_batches_give_each_sample_what_it_gives_alone():
    """Teacher captions, pass 1 and pass 2 of a batch mixing 4 views and 1 view equal each sample
    run alone: the views, their prompts and the left padding line up."""
    from pg_train.model import build_model
    from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
    from pg_train.objectives.settings import PseudoGumbelConfig

    model = build_model("tiny", seed=0).eval()
    model.preset = dataclasses.replace(
        model.preset,
        vision=dataclasses.replace(
            model.preset.vision, dynamic_image_size=True, max_dynamic_patch=3, use_thumbnail=True
        ),
    )
    preprocess = preprocess_for(model.preset)
    dataset = PairDataset(Pairs(), preprocess)
    items = [dataset[0], dataset[1]]
    assert [int(i["num_views1"]) for i in items] == [4, 1]  # 3 tiles + thumbnail; a square: one view
    cfg = PseudoGumbelConfig(max_caption_len=5, topk=16)

    def run(batch_items):
        batch = collate_pairs(batch_items)
        batch["sample_seeds"] = torch.tensor([7 + i["index"] for i in batch_items])
        with torch.no_grad():
            return pseudo_gumbel_step(model, model, batch, cfg)

    both = run(items)
    assert both.region_k.tolist()[0] >= 1
    for row, item in enumerate(items):
        alone = run([item])
        n = int(alone.caption_lengths[0])
        assert both.caption_ids[row, :n].tolist() == alone.caption_ids[0, :n].tolist()
        torch.testing.assert_close(both.mask_logits[row], alone.mask_logits[0], atol=1e-4, rtol=1e-4)


def test_tiling_and_config_template_overrides_from_the_training_config():
    from pg_train.config import load_config
    from pg_train.data.loader import preprocess_for
    from pg_train.train import build_student

    cfg = load_config(
        overrides=[
            "model.dynamic_image_size=true",
            "model.max_dynamic_patch=4",
            "model.use_thumbnail=true",
            "model.chat_template=qwen_chat",
        ]
    )
    model = build_student(cfg)
    tiling = preprocess_for(model.preset).tiling
    assert (tiling.dynamic, tiling.max_num, tiling.use_thumbnail) == (True, 4, True)
    assert model.prompts.chat_template == "qwen_chat" and model.prompts.stop.end_text == "<|im_end|>"
    import pytest as _pytest

    from pg_train.config import ConfigError

    with _pytest.raises(ConfigError, match="model.chat_template"):
        load_config(overrides=["model.chat_template=vicuna"])


def test_tiling_views_counted_by_memcheck_and_bench_flops():
    """memcheck's activation model and bench.step's FLOPs grow with the views a tiled image gives."""
    from pg_train.bench.step import model_flops
    from pg_train.memcheck.predict import Deployment, predict
    from pg_train.model import build_model

    model = build_model("sa2va-4b", device="meta")
    one = predict(model, Deployment(image_size=(448, 448)))
    coco = predict(model, Deployment(image_size=(640, 480)))
    assert (one.views, coco.views) == (1, 13)
    pass1 = "pass 1 (caption logits)"
    # the LLM's saved activations are per token: 13 x 256 image tokens instead of 256
    assert coco.phases[pass1]["saved"] > 5 * one.phases[pass1]["saved"]
    tiny = build_model("tiny", seed=0)
    assert model_flops(tiny, 1, 8, views=13) > 5 * model_flops(tiny, 1, 8, views=1)
