"""Region mask -> grid cells, against the released Sa2VA's rule written out independently.

The official code (`predict_forward` in projects/llava_sam2/hf/models/modeling_sa2va_chat.py, and
its training datasets) resizes the region mask AT THE IMAGE'S FULL RESOLUTION to the G x G grid:

    F.interpolate(mask.unsqueeze(0), size=(16, 16), mode='nearest')  ->  cells where .bool()

Nearest-neighbour output index i reads input index floor(i * in / out). `reference_cells` below
is that rule as plain numpy index arithmetic (no torch); a few cases check it against torch's
F.interpolate itself. A mask that no cell samples gets K = 0 in the official prompt
(`region1<vp></vp>`); objective.empty_region_policy chooses what pg_train does then.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pg_train.data import ManifestPairs, PairDataset, Preprocess
from pg_train.model.text.regions import EMPTY_REGION_POLICIES, region_cells, region_grids, select_cells

G = 16


def reference_cells(mask: np.ndarray, grid: int = G) -> np.ndarray:
    """bool [grid, grid]: cell (i, j) is set when pixel (floor(i*H/grid), floor(j*W/grid)) is non-zero."""
    H, W = mask.shape
    rows = (np.arange(grid) * H) // grid
    cols = (np.arange(grid) * W) // grid
    return mask[np.ix_(rows, cols)] != 0


def generated_masks(count: int, H: int, W: int, seed: int) -> np.ndarray:
    """bool [count, H, W]: rectangles, ragged blobs, 1-px rows / columns / diagonals, a few
    scattered pixels, and shapes touching the image border, in turn."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, H, W), dtype=bool)
    for n in range(count):
        m = masks[n]
        kind = n % 6
        h, w = int(rng.integers(1, max(2, H // 2))), int(rng.integers(1, max(2, W // 2)))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        if kind == 0:  # rectangle
            m[top : top + h, left : left + w] = True
        elif kind == 1:  # ragged blob
            m[top : top + h, left : left + w] = rng.random((h, w)) > 0.4
            m[top + h // 2, left + w // 2] = True
        elif kind == 2:  # thin: a 1-px column or row, full or partial
            if rng.random() < 0.5:
                m[top : top + h if rng.random() < 0.5 else H, int(rng.integers(0, W))] = True
            else:
                m[int(rng.integers(0, H)), left : left + w if rng.random() < 0.5 else W] = True
        elif kind == 3:  # thin diagonal
            length = min(h, w)
            m[top + np.arange(length), left + np.arange(length)] = True
        elif kind == 4:  # tiny: 1-4 scattered pixels
            k = int(rng.integers(1, 5))
            m[rng.integers(0, H, k), rng.integers(0, W, k)] = True
        else:  # touching the border (a corner or an edge strip)
            side = int(rng.integers(0, 4))
            if side == 0:
                m[:h, :w] = True
            elif side == 1:
                m[H - h :, W - w :] = True
            elif side == 2:
                m[:, : 1 + int(rng.integers(0, 3))] = True
            else:
                m[H - 1 - int(rng.integers(0, 3)) :, left : left + w] = True
    return masks


RESOLUTIONS = [(480, 640), (640, 480), (427, 640), (448, 448), (1024, 1024), (333, 500), (37, 53), (15, 17), (16, 16)]


def test_region_grids_equal_the_index_rule_over_thousands_of_masks():
    total = empty = 0
    for r, (H, W) in enumerate(RESOLUTIONS):
        count = 120 if H * W > 500_000 else 400
        masks = generated_masks(count, H, W, seed=r)
        nearest, coverage = region_grids(torch.from_numpy(masks).float(), G)
        for n in range(count):
            expected = reference_cells(masks[n])
            assert np.array_equal(nearest[n].numpy(), expected), (H, W, n)
            empty += not expected.any()
        # coverage: the covered fraction of each cell, against block sums where cells are whole pixels
        if H % G == 0 and W % G == 0:
            blocks = masks.reshape(count, G, H // G, G, W // G).mean(axis=(2, 4))
            np.testing.assert_allclose(coverage.numpy(), blocks, atol=1e-6)
        total += count
    assert total >= 3000 and empty > 300  # many thin / tiny masks sample no cell (official K = 0)


@pytest.mark.parametrize("grid", [16, 4, 7])
def test_reference_rule_is_torch_nearest_interpolate(grid):
    for r, (H, W) in enumerate([(480, 640), (37, 53), (1024, 1024)]):
        masks = generated_masks(12, H, W, seed=100 + r)
        official = F.interpolate(torch.from_numpy(masks).float().unsqueeze(0), size=(grid, grid), mode="nearest")
        for n in range(len(masks)):
            assert np.array_equal(official[0, n].bool().numpy(), reference_cells(masks[n], grid)), (H, W, n)


def one_pixel_column(H=480, W=640, x=41) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[:, x] = True  # beside sample column 40 (every 40th is read): official K = 0
    return mask


def manifest_of(tmp_path, masks: list[np.ndarray]) -> ManifestPairs:
    lines = []
    for i, mask in enumerate(masks):
        H, W = mask.shape
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"{i}_mask.png")
        lines.append(json.dumps({"image": f"{i}.png", "mask": f"{i}_mask.png", "caption": f"object {i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return ManifestPairs(tmp_path / "m.jsonl")


def test_loader_cells_come_from_the_full_resolution_mask(tmp_path):
    """Through a manifest of PNG files (640x480): the batch's cell maps are the official rule on
    the file's mask. The 448-px area-resized mask the batch also carries would add edge cells."""
    masks = [one_pixel_column()] + list(generated_masks(23, 480, 640, seed=7))
    dataset = PairDataset(manifest_of(tmp_path, masks), Preprocess(mllm_size=448, sam_size=64))
    detour_differs = 0
    for n in range(len(masks)):
        item = dataset[n]
        loaded = n + len(item["skipped"])  # a mask under the loader's minimum size is replaced by the next
        expected = reference_cells(masks[loaded % len(masks)])
        assert np.array_equal(item["region_nearest1"].numpy(), expected), n
        via_448, _ = region_cells(item["region_masks1"][None], G, empty_policy="official")
        detour_differs += not np.array_equal(via_448[0].numpy(), expected)
    first = dataset[0]
    assert not first["region_nearest1"].any()  # the 1-px column: K = 0 as official
    assert region_cells(first["region_masks1"][None], G)[0].sum() == G  # the 448 detour gave K = 16
    assert detour_differs >= 5


def test_prediction_inputs_cells_come_from_the_full_resolution_mask():
    from pg_train.inference import image_inputs
    from pg_train.model import build_model

    model = build_model("tiny", seed=0).eval()
    masks = [one_pixel_column(), generated_masks(6, 300, 520, seed=3)[1]]
    images = [Image.new("RGB", (m.shape[1], m.shape[0])) for m in masks]
    batch = image_inputs(model, images, masks)
    for n, mask in enumerate(masks):
        assert np.array_equal(batch["region_nearest1"][n].cpu().numpy(), reference_cells(mask, model.grid_size))


def test_empty_region_policies():
    """K = 0: official keeps it (the prompt's `<vp></vp>`), largest the most-covered cell, error raises;
    every policy reports which samples had no cell."""
    assert EMPTY_REGION_POLICIES == ("largest", "official", "error")
    masks = torch.zeros(2, 480, 640)
    masks[0, :, 17] = 1  # 1-px column inside cell column 0 (pixels 0..39)
    masks[0, 100:103, 50:52] = 1  # 6 pixels in cell (3, 1): the column covers cell (i, 0) more
    masks[1, 0:60, 0:80] = 1
    nearest, coverage = region_grids(masks, G)
    official, empty = select_cells(nearest, coverage, empty_policy="official")
    assert empty.tolist() == [True, False]
    assert official.flatten(1).sum(1).tolist() == [0, 4]
    largest, empty_too = select_cells(nearest, coverage, empty_policy="largest")
    assert torch.equal(empty, empty_too) and torch.equal(largest[1], official[1])
    assert largest[0].nonzero().tolist() == [[0, 0]]  # the column covers 1/40 of each cell (i, 0): the first
    with pytest.raises(ValueError, match="select no grid cell"):
        select_cells(nearest, coverage, empty_policy="error")
    with pytest.raises(ValueError, match="unknown empty_policy"):
        select_cells(nearest, coverage, empty_policy="drop")
    with pytest.raises(ValueError, match="are empty"):  # no pixel at all: nothing to describe
        region_cells(torch.zeros(1, 48, 64), G, empty_policy="official")


def test_region_rule_nearest_is_the_default_and_differs_from_coverage():
    mask = torch.zeros(1, 448, 448)
    mask[0, 1:27, 1:27] = 1  # 86% of cell (0, 0) but not its sample pixel (0, 0)
    mask[0, 28, 28:30] = 1  # two pixels of cell (1, 1), its sample pixel among them
    default, _ = region_cells(mask, 16)
    nearest, _ = region_cells(mask, 16, rule="nearest")
    coverage, _ = region_cells(mask, 16, rule="coverage")
    assert torch.equal(default, nearest)
    assert nearest[0].nonzero().tolist() == [[1, 1]]
    assert coverage[0].nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="unknown region rule"):
        region_cells(mask, 16, rule="bilinear")
