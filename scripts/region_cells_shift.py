"""How many synthetic regions sample no grid cell (official K = 0), and how many masks' cells
the old route through a 448-px area-resized mask changed (issue 30; docs/design.md, "Regions
with no cell").

    PYTHONPATH=. .venv/bin/python scripts/region_cells_shift.py
"""

from __future__ import annotations

import numpy as np
import torch

from pg_train.data import SyntheticPairs
from pg_train.data.images import mask_tensor
from pg_train.model.text.regions import region_grids


def main(count: int = 400, grid: int = 16) -> None:
    for image_size, sizes in ((448, ("small", "medium", "large")), (448, ("small",)), (128, ("large",))):
        source = SyntheticPairs(count, seed=0, image_size=image_size, sizes=sizes)
        empty = changed = extra = 0
        for i in range(count):
            mask = source.load(i).mask1
            full, _ = region_grids(torch.from_numpy(mask.astype(np.float32))[None], grid)
            via_448, _ = region_grids(mask_tensor(mask, 448)[None], grid)
            empty += not full.any()
            changed += not torch.equal(full, via_448)
            extra += int((via_448 & ~full).sum())
        print(
            f"{image_size}-px scenes, sizes {list(sizes)}: {count} masks, official K = 0: {empty}; "
            f"cells differ through 448 px: {changed} masks ({extra} extra cells)"
        )


if __name__ == "__main__":
    main()
