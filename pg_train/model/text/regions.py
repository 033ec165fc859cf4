"""Region mask -> cells of the image-token grid (the visual prompt's K slots).

The released Sa2VA takes the region mask at the image's full resolution and resizes it to the
G x G grid of the view the region indexes with `F.interpolate(mode="nearest")` (in
`predict_forward` and in its training datasets): cell (i, j) reads pixel
(floor(i * H / G), floor(j * W / G)). The cells must come from the full-resolution mask: the same
rule applied to an area-resized copy (448 px) adds cells at the object's edges.
`region_grids` is that one step; the data pipeline runs it per sample on the mask as loaded, and
`select_cells` chooses the K cells from its two maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REGION_RULES = ("nearest", "coverage")
# K = 0 (no cell selected): "largest" keeps the most-covered cell (K = 1), "official" writes
# `region1<vp></vp>` as the released code does (the region vanishes from the prompt), "error" raises.
EMPTY_REGION_POLICIES = ("largest", "official", "error")


def region_coverage(masks: torch.Tensor, grid_size: int) -> torch.Tensor:
    """masks [B, H, W] -> fraction of each grid cell covered [B, G, G].

    Mask values are per-pixel coverage in [0, 1]: binary masks, or area fractions."""
    if masks.dim() != 3:
        raise ValueError(f"region masks must be [B, H, W], got shape {tuple(masks.shape)}")
    return F.adaptive_avg_pool2d(masks.float().clamp(0, 1)[:, None], grid_size)[:, 0]


def region_grids(masks: torch.Tensor, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, H, W] at the image's resolution -> (nearest [B, G, G] bool: the cell's sample
    pixel is non-zero, the official rule; coverage [B, G, G] float: the covered fraction)."""
    if masks.dim() != 3:
        raise ValueError(f"region masks must be [B, H, W], got shape {tuple(masks.shape)}")
    nearest = F.interpolate(masks.float()[:, None], size=(grid_size, grid_size), mode="nearest")[:, 0] != 0
    return nearest, region_coverage(masks, grid_size)


def select_cells(
    nearest: torch.Tensor,
    coverage: torch.Tensor,
    threshold: float = 0.5,
    empty_policy: str = "largest",
    rule: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid cells of each region from its two maps (`region_grids`).

    `rule`: "nearest" (the released Sa2VA's) takes `nearest`; "coverage" the cells covered at
    least `threshold`. Either can select no cell for a thin or small region; `empty_policy`
    (EMPTY_REGION_POLICIES) says what then. Returns (cells [B, G, G] bool, empty [B] bool: which
    samples selected no cell — counted whatever the policy). A mask with no pixel at all is an
    error: there is no region to describe.
    """
    if rule == "nearest":
        cells = nearest.bool()
    elif rule == "coverage":
        cells = coverage >= threshold
    else:
        raise ValueError(f"unknown region rule {rule!r}; expected one of {REGION_RULES}")
    if empty_policy not in EMPTY_REGION_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; expected one of {EMPTY_REGION_POLICIES}")
    empty = ~cells.flatten(1).any(dim=1)
    if empty.any():
        no_pixels = coverage.flatten(1).amax(dim=1) == 0
        if no_pixels.any():
            raise ValueError(f"region masks of samples {no_pixels.nonzero().flatten().tolist()} are empty")
        if empty_policy == "error":
            raise ValueError(
                f"regions of samples {empty.nonzero().flatten().tolist()} select no grid cell (region rule {rule!r})"
            )
        if empty_policy == "largest":
            flat = coverage.flatten(1)
            best = F.one_hot(flat.argmax(dim=1), flat.shape[1]).bool().view_as(cells)
            cells = torch.where(empty[:, None, None], best, cells)
    return cells, empty


def region_cells(
    masks: torch.Tensor, grid_size: int, threshold: float = 0.5, empty_policy: str = "largest", rule: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, H, W] at the image's resolution -> (cells [B, G, G] bool, empty [B] bool):
    `select_cells` of the mask's `region_grids`."""
    return select_cells(*region_grids(masks, grid_size), threshold, empty_policy, rule)
