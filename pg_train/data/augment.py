"""The second view: one random geometric + photometric augmentation applied to image and mask alike."""

from __future__ import annotations

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from torchvision.transforms import InterpolationMode


def augmented_view(
    image: Image.Image, mask: np.ndarray, rng: np.random.Generator, min_pixels: int = 1, tries: int = 5
) -> tuple[Image.Image, np.ndarray]:
    """Flip, affine (rotation, scale, translation — which also crops), colour jitter.

    The mask goes through the same geometry with nearest interpolation. If the object leaves
    the frame (fewer than `min_pixels` remain) new parameters are drawn; after `tries` the view
    keeps only the flip and the colour jitter, so the object is always there.
    """
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
    if rng.random() < 0.5:
        image, mask_image = TF.hflip(image), TF.hflip(mask_image)
    w, h = image.size
    for _ in range(tries):
        angle = float(rng.uniform(-15, 15))
        scale = float(rng.uniform(0.8, 1.25))
        translate = [int(rng.uniform(-0.1, 0.1) * w), int(rng.uniform(-0.1, 0.1) * h)]
        moved_mask = TF.affine(
            mask_image,
            angle=angle,
            translate=translate,
            scale=scale,
            shear=[0.0],
            interpolation=InterpolationMode.NEAREST,
        )
        if (np.asarray(moved_mask) > 127).sum() >= min_pixels:
            image = TF.affine(
                image,
                angle=angle,
                translate=translate,
                scale=scale,
                shear=[0.0],
                interpolation=InterpolationMode.BILINEAR,
            )
            mask_image = moved_mask
            break
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.7, 1.3)))
    return image, np.asarray(mask_image) > 127


def second_view(
    image: Image.Image, mask: np.ndarray, pairing: str, seed: int, index: int, min_pixels: int = 1
) -> tuple[Image.Image, np.ndarray]:
    """Image 2 of a source that has one image per sample: the image itself (`pairing="same"`) or
    an augmented view of it (`"augment"`), drawn from (seed, index) so a sample's view is the same
    in every epoch, worker and resumed run."""
    if pairing == "same":
        return image, mask
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    return augmented_view(image, mask, rng, min_pixels=min_pixels)
