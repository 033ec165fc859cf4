"""Region mask -> cells of the image-token grid (the visual prompt's K slots)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_coverage(masks: torch.Tensor, grid_size: int) -> torch.Tensor:
    """masks [B, H, W] -> fraction of each grid cell covered [B, G, G].

    Mask values are per-pixel coverage in [0, 1]: binary masks, or the area fractions the data
    pipeline produces when it resizes a mask."""
    if masks.dim() != 3:
        raise ValueError(f"region masks must be [B, H, W], got shape {tuple(masks.shape)}")
    return F.adaptive_avg_pool2d(masks.float().clamp(0, 1)[:, None], grid_size)[:, 0]


REGION_RULES = ("nearest", "coverage")


def region_cells(
    masks: torch.Tensor, grid_size: int, threshold: float = 0.5, empty_policy: str = "largest", rule: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the grid cells of each region.

    `rule`:
      - "nearest" (the released Sa2VA's): the mask resized to the G x G grid by nearest-neighbour
        sampling (`F.interpolate(..., mode="nearest")`: cell (i, j) reads pixel
        (floor(i * H / G), floor(j * W / G))); a cell is set where that pixel is non-zero;
      - "coverage": cells covered at least `threshold`.
    Either can select no cell for a small region (the official code then writes `<vp></vp>` and
    the region silently vanishes from the prompt). `empty_policy`:
      - "largest": keep the single cell of largest coverage (K = 1), counted in the second output;
      - "error": raise.
    Returns (cells [B, G, G] bool, fallback [B] bool — which samples needed the policy).
    A mask with no pixel at all is an error either way: there is no region to describe.
    """
    coverage = region_coverage(masks, grid_size)
    if rule == "nearest":
        cells = F.interpolate(masks.float()[:, None], size=(grid_size, grid_size), mode="nearest")[:, 0] > 0
    elif rule == "coverage":
        cells = coverage >= threshold
    else:
        raise ValueError(f"unknown region rule {rule!r}; expected one of {REGION_RULES}")
    empty = ~cells.flatten(1).any(dim=1)
    if empty.any():
        no_pixels = coverage.flatten(1).amax(dim=1) == 0
        if no_pixels.any():
            raise ValueError(f"region masks of samples {no_pixels.nonzero().flatten().tolist()} are empty")
        if empty_policy == "error":
            raise ValueError(
                f"regions of samples {empty.nonzero().flatten().tolist()} select no grid cell (region rule {rule!r})"
            )
        if empty_policy != "largest":
            raise ValueError(f"unknown empty_policy {empty_policy!r}; expected 'largest' or 'error'")
        flat = coverage.flatten(1)
        best = F.one_hot(flat.argmax(dim=1), flat.shape[1]).bool().view_as(cells)
        cells = torch.where(empty[:, None, None], best, cells)
    return cells, empty
