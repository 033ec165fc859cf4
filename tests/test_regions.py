"""Region mask -> grid cells, against the released Sa2VA's rule written out by hand.

The official code resizes the full-resolution region mask to the 16x16 grid with
`F.interpolate(mode="nearest")`: output cell (i, j) takes input pixel (floor(i*H/G), floor(j*W/G)),
and `.bool()` sets every cell whose sample is non-zero.
"""

import pytest
import torch

from pg_train.model.text.regions import region_cells


def nearest_by_hand(mask: torch.Tensor, grid: int) -> torch.Tensor:
    H, W = mask.shape
    cells = torch.zeros(grid, grid, dtype=torch.bool)
    for i in range(grid):
        for j in range(grid):
            cells[i, j] = bool(mask[(i * H) // grid, (j * W) // grid] != 0)
    return cells


def random_masks(count: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Rectangles and blobs of many sizes, some far smaller than a cell."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, H, W)
    for n in range(count):
        h = int(torch.randint(2, H // 2, (1,), generator=g))
        w = int(torch.randint(2, W // 2, (1,), generator=g))
        top = int(torch.randint(0, H - h, (1,), generator=g))
        left = int(torch.randint(0, W - w, (1,), generator=g))
        masks[n, top : top + h, left : left + w] = 1
        if n % 3 == 0:  # ragged edges
            masks[n] *= (torch.rand(H, W, generator=g) > 0.3).float()
            masks[n, top + h // 2, left + w // 2] = 1
    return masks


@pytest.mark.parametrize("shape", [(448, 448), (480, 640), (1024, 1024), (37, 53)])
def test_region_rule_nearest_equals_the_official_resize(shape):
    masks = random_masks(40, *shape)
    cells, fallback = region_cells(masks, 16, rule="nearest")
    for n in range(len(masks)):
        expected = nearest_by_hand(masks[n], 16)
        if expected.any():
            assert torch.equal(cells[n], expected), n
            assert not fallback[n]
        else:  # K = 0: never silent
            assert fallback[n] and cells[n].sum() == 1


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


def test_region_rule_nearest_empty_region_policy():
    mask = torch.zeros(1, 448, 448)
    mask[0, 5:20, 5:20] = 1  # misses every sample pixel
    cells, fallback = region_cells(mask, 16, rule="nearest")
    assert fallback.tolist() == [True] and cells[0].nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="select no grid cell"):
        region_cells(mask, 16, rule="nearest", empty_policy="error")
    with pytest.raises(ValueError, match="unknown region rule"):
        region_cells(mask, 16, rule="bilinear")
