"""Reading images and masks robustly, and turning them into model inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .types import BadSample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the file held: EXIF orientation applied; grayscale, palette, RGBA (composited
    on black) and 16-bit images converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit full scale (0..65535) to 8 bits; keeps relative brightness across images.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _read(path: str | Path, where: str, convert) -> object:
    """Open an image file fully (so truncation is found here) and convert it, or raise
    BadSample: missing_file / unreadable_image, naming the path."""
    path = Path(path)
    if not path.is_file():
        raise BadSample("missing_file", where, str(path))
    try:
        with Image.open(path) as image:
            image.load()
            return convert(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadSample("unreadable_image", where, f"{path}: {err}") from err


def open_image(path: str | Path, where: str) -> Image.Image:
    return _read(path, where, to_rgb)


def mask_from_array(array: np.ndarray, where: str) -> np.ndarray:
    """A binary mask from 0/1, 0/255 or 0/any-single-value arrays; anything else is refused
    (a soft or multi-label mask silently thresholded would train on the wrong object)."""
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise BadSample("non_binary_mask", where, "colour mask with differing channels")
        array = array[..., 0]
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        raise BadSample("non_binary_mask", where, f"values {values[:6].tolist()}{'...' if len(values) > 6 else ''}")
    return array > 0


def open_mask(path: str | Path, where: str) -> np.ndarray:
    array = _read(path, where, lambda image: np.asarray(ImageOps.exif_transpose(image)))
    return mask_from_array(array, f"{where} ({Path(path).name})")


def decode_rle(rle: dict, where: str) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool [H, W]."""
    from pycocotools import mask as mask_utils

    try:
        height, width = rle["size"]
        counts = rle["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(bool)
    except (KeyError, TypeError, ValueError) as err:
        raise BadSample("malformed_record", where, f"bad RLE: {err}") from err


def check_pair(image: Image.Image, mask: np.ndarray, where: str, min_pixels: int) -> None:
    if mask.shape != (image.height, image.width):
        raise BadSample("size_mismatch", where, f"mask {mask.shape[1]}x{mask.shape[0]}, image {image.width}x{image.height}")
    if int(mask.sum()) < min_pixels:
        raise BadSample("empty_mask", where, f"{int(mask.sum())} pixels < {min_pixels}")


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Direct (aspect-ignoring) bicubic resize to size x size, ImageNet-normalised [3, size, size]."""
    resized = image.resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array - mean) / std


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool [H, W] -> [size, size] float: the covered fraction of each output pixel (area
    resampling keeps an object smaller than one output pixel visible instead of dropping it)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    if t.shape[-2:] == (size, size):
        return t[0, 0]
    if t.shape[-2] >= size and t.shape[-1] >= size:
        return F.adaptive_avg_pool2d(t, size)[0, 0]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
