"""InternVL's dynamic tiling: how a released Sa2VA checkpoint sees an image.

The image is resized to a grid of `cols x rows` tiles of `image_size` px (1 <= min_num <=
cols*rows <= max_num), the grid chosen by aspect ratio; with `use_thumbnail` and more than one
tile, the whole image resized to one tile is appended last. Each view gives the ViT's 256 tokens
(Sa2VA-4B: a 640x480 image -> 3x4 grid... see tests/test_tiling.py). The visual prompt (region)
indexes the last view's token grid: the thumbnail, or the single view.

The grid choice is InternVL's `find_closest_aspect_ratio`: the candidate grids in order of tile
count, the smallest aspect-ratio difference wins, and on a tie the later (larger) grid wins when
the image has more than half its pixel count.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Tiling:
    """The checkpoint's config.json keys (`dynamic_image_size`, `min_dynamic_patch`,
    `max_dynamic_patch`, `use_thumbnail`) and the view size."""

    image_size: int = 448
    dynamic: bool = False
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True

    def __post_init__(self):
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(
                f"tiling needs 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_num}, {self.max_num}"
            )

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of the tile grid for an image of width x height."""
        if not self.dynamic:
            return 1, 1
        candidates = sorted(
            {
                (i, j)
                for n in range(self.min_num, self.max_num + 1)
                for i in range(1, n + 1)
                for j in range(1, n + 1)
                if self.min_num <= i * j <= self.max_num
            },
            key=lambda ratio: ratio[0] * ratio[1],
        )
        aspect = width / height
        best, best_diff = (1, 1), float("inf")
        for cols, rows in candidates:
            diff = abs(aspect - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and width * height > 0.5 * self.image_size**2 * cols * rows:
                best = (cols, rows)
        return best

    def num_views(self, width: int, height: int) -> int:
        """Tiles plus the thumbnail (only added when there is more than one tile)."""
        cols, rows = self.grid(width, height)
        tiles = cols * rows
        return tiles + (1 if self.use_thumbnail and tiles > 1 else 0)

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The views in InternVL's order: tiles row-major, then the thumbnail."""
        size = self.image_size
        cols, rows = self.grid(*image.size)
        if cols * rows == 1:
            return [image.resize((size, size), Image.BICUBIC)]
        resized = image.resize((cols * size, rows * size), Image.BICUBIC)
        tiles = [
            resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
        ]
        if self.use_thumbnail:
            tiles.append(image.resize((size, size), Image.BICUBIC))
        return tiles
