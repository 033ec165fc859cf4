"""The embedded default data: deterministic scenes of coloured, textured shapes with exact masks.

Scene `i` of seed `s` is a pure function of (s, i): several objects (sizes down to smaller than
one 28-px cell of the 16x16 prompt grid at 448 px, overlaps resolved by drawing order), the
exact visible mask of each, and a templated description of the target ("the small red striped
triangle at the top left"). The second image is an augmented view of the first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .augment import augmented_view
from .types import RawPair

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 120, 190),
    "brown": (130, 85, 40),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "rectangle", "ellipse", "star", "diamond", "hexagon")
TEXTURES = ("plain", "striped", "dotted", "checkered")
CAPTION_STYLES = ("full", "colour_shape", "colour")
SIZES = {"tiny": (8, 22), "small": (30, 70), "medium": (80, 140), "large": (150, 220)}  # object extent, px at 448


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    texture: str
    size: str
    center: tuple[float, float]
    extent: float
    angle: float

    def describe(self, width: int, height: int, style: str = "full") -> str:
        """`full`: "the large red striped square at the top left"; `colour_shape`: "the red
        square"; `colour`: "the red one" (shorter captions: an easier task for a random model)."""
        if style == "colour_shape":
            return f"the {self.colour} {self.shape}"
        if style == "colour":
            return f"the {self.colour} one"
        x, y = self.center
        vertical = "top" if y < height / 3 else "bottom" if y > 2 * height / 3 else "middle"
        horizontal = "left" if x < width / 3 else "right" if x > 2 * width / 3 else "center"
        where = (
            "center"
            if (vertical, horizontal) == ("middle", "center")
            else f"{vertical} {horizontal}".replace("middle ", "")
        )
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"the {self.size} {self.colour} {texture}{self.shape} at the {where}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def ring(n, radii, phase=0.0):
        return [
            (
                cx + radii[i % len(radii)] * math.cos(angle + phase + 2 * math.pi * i / n),
                cy + radii[i % len(radii)] * math.sin(angle + phase + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "diamond":
        return ring(4, [r])
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "star":
        return ring(10, [r, r * 0.45], -math.pi / 2)
    if shape == "rectangle":
        w, h = r, r * 0.5
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h))]
    return None


def _shape_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = obj.center
    r = obj.extent / 2
    points = _polygon(obj.shape, cx, cy, r, obj.angle)
    if points is not None:
        draw.polygon(points, fill=255)
    elif obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:  # ellipse
        draw.ellipse([cx - r, cy - r * 0.55, cx + r, cy + r * 0.55], fill=255)
    return np.asarray(canvas) > 127


def _texture(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """The object's colour field [H, W, 3]: plain, or a pattern of the colour and a darker shade."""
    base = np.array(COLOURS[obj.colour], dtype=np.float32)
    dark = base * 0.45
    yy, xx = np.mgrid[0:height, 0:width]
    period = max(4, int(obj.extent / 6))
    if obj.texture == "striped":
        pattern = ((xx + yy) // period) % 2 == 0
    elif obj.texture == "dotted":
        pattern = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 > (period / 3) ** 2
    elif obj.texture == "checkered":
        pattern = ((xx // period) + (yy // period)) % 2 == 0
    else:
        pattern = np.ones((height, width), dtype=bool)
    return np.where(pattern[..., None], base, dark)


class SyntheticPairs:
    """`len` scenes; `load(i)` -> RawPair of image/mask, augmented image/mask (the same image and
    mask with `pairing="same"`), description."""

    def __init__(
        self,
        num_samples: int = 512,
        seed: int = 0,
        image_size: int = 448,
        min_objects: int = 2,
        max_objects: int = 5,
        min_pixels: int = 16,
        sizes: tuple[str, ...] = tuple(SIZES),
        colours: tuple[str, ...] = tuple(COLOURS),
        textures: tuple[str, ...] = TEXTURES,
        distinct_colours: bool = False,
        pairing: str = "augment",
        sample_offset: int = 0,
        caption_style: str = "full",
    ):
        for field, chosen, known in (
            ("sizes", sizes, SIZES),
            ("colours", colours, COLOURS),
            ("textures", textures, TEXTURES),
        ):
            unknown = set(chosen) - set(known)
            if unknown or not chosen:
                raise ValueError(
                    f"synthetic {field} {sorted(unknown) or list(chosen)}: expected a non-empty subset of {list(known)}"
                )
        if sample_offset < 0:
            raise ValueError(f"synthetic sample_offset must be >= 0, got {sample_offset}")
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"synthetic caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
        if pairing not in ("same", "augment"):
            raise ValueError(f"synthetic pairing must be 'same' or 'augment', got {pairing!r}")
        if distinct_colours and len(colours) < max_objects:
            raise ValueError(
                f"synthetic distinct_colours needs at least max_objects={max_objects} colours, got {len(colours)}"
            )
        self.sizes = tuple(sizes)
        self.colours = tuple(colours)
        self.textures = tuple(textures)
        self.distinct_colours = distinct_colours
        self.pairing = pairing
        self.num_samples = num_samples
        self.sample_offset = sample_offset
        self.caption_style = caption_style
        self.seed = seed
        self.image_size = image_size
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.min_pixels = min_pixels

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, index, stream]))

    def scene(self, index: int) -> tuple[Image.Image, list[SceneObject], list[np.ndarray]]:
        """The image, its objects in drawing order and each object's visible mask (scene
        `sample_offset + index` of the seed: sources with disjoint offset ranges share no scene)."""
        rng = self._rng(self.sample_offset + index, 0)
        size = self.image_size
        scale = size / 448
        background = np.array(rng.integers(60, 200, size=3), dtype=np.float32)
        yy, xx = np.mgrid[0:size, 0:size]
        shade = (0.85 + 0.3 * (xx + yy) / (2 * size))[..., None]
        pixels = background * shade + rng.normal(0, 6, size=(size, size, 3))
        objects, masks = [], []
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        # distinct colours: the colour word alone then names the object (an easier grounding task)
        palette = [str(c) for c in rng.permutation(self.colours)[:count]] if self.distinct_colours else None
        for n in range(count):
            size_name = str(rng.choice(list(self.sizes)))
            low, high = SIZES[size_name]
            extent = float(rng.uniform(low, high)) * scale
            margin = extent / 2
            obj = SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=palette[n] if palette else str(rng.choice(self.colours)),
                texture=str(rng.choice(self.textures)),
                size=size_name,
                center=(float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))),
                extent=extent,
                angle=float(rng.uniform(0, 2 * math.pi)),
            )
            mask = _shape_mask(obj, size, size)
            pixels = np.where(mask[..., None], _texture(obj, size, size), pixels)
            masks = [m & ~mask for m in masks]  # later objects occlude earlier ones
            objects.append(obj)
            masks.append(mask)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
        return image, objects, masks

    def load(self, index: int) -> RawPair:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic index {index} outside [0, {self.num_samples})")
        image, objects, masks = self.scene(index)
        rng = self._rng(self.sample_offset + index, 1)
        visible = [i for i, m in enumerate(masks) if m.sum() >= self.min_pixels]
        target = int(rng.choice(visible)) if visible else int(np.argmax([m.sum() for m in masks]))
        if self.pairing == "same":
            image2, mask2 = image, masks[target]
        else:
            image2, mask2 = augmented_view(image, masks[target], rng, min_pixels=self.min_pixels)
        return RawPair(
            image1=image,
            mask1=masks[target],
            image2=image2,
            mask2=mask2,
            caption=objects[target].describe(self.image_size, self.image_size, self.caption_style),
            where=f"synthetic(seed={self.seed}, index={self.sample_offset + index})",
        )

    def export_manifest(self, directory: str | Path, name: str = "manifest.jsonl") -> Path:
        """Write every pair as PNG files plus a JSONL manifest (see manifest.py)."""
        directory = Path(directory)
        (directory / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(self.num_samples):
            pair = self.load(i)
            record = {"caption": pair.caption}
            for key, value in (("image1", pair.image1), ("image2", pair.image2)):
                value.save(directory / "images" / f"{i:06d}_{key}.png")
                record[key] = f"images/{i:06d}_{key}.png"
            for key, value in (("mask1", pair.mask1), ("mask2", pair.mask2)):
                Image.fromarray(value.astype(np.uint8) * 255).save(directory / "images" / f"{i:06d}_{key}.png")
                record[key] = f"images/{i:06d}_{key}.png"
            lines.append(json.dumps(record))
        path = directory / name
        path.write_text("\n".join(lines) + "\n")
        return path
