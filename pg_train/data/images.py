"""Reading images and masks robustly, and turning them into model inputs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

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


# 8192 x 8192 = 67 M pixels: an RGB decode of at most 192 MiB and a full-resolution float mask
# of 256 MiB per worker, far above any Sa2VA training image (resized to 448 and 1024 anyway).
# `data.max_image_pixels` changes it; PIL's own limit plays no part (see _pil_bomb_check_off).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Formats whose decoder never returns the pixels that were written: a mask in one is refused
# rather than thresholded (see mask_from_array).
LOSSY_MASK_FORMATS = frozenset({"JPEG", "MPO"})


@contextlib.contextmanager
def _pil_bomb_check_off():
    """PIL's own decompression-bomb check off while a header is read: `_read` checks the size
    against `data.max_image_pixels` itself, before decoding, so PIL's default (warn at 89.5 M,
    raise at 179 M pixels, with a message naming no file) never decides. Restored at once; data
    reading is single-threaded per process (DataLoader workers are processes)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read(path: str | Path, where: str, convert, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> object:
    """Open an image file fully (so truncation is found here) and convert it, or raise
    BadSample naming the path: missing_file, image_too_large (checked from the header, before
    any pixel is decoded), unreadable_image (anything the decoder raises: one bad file is its
    sample's problem, never the run's). `path` may be an io.BytesIO: an image held in a
    dataset cell (hf.py), checked and decoded the same way."""
    if not isinstance(path, io.BytesIO):
        path = Path(path)
        try:
            exists = path.is_file()
        except (OSError, ValueError) as err:  # a NUL byte, a name too long for the file system
            raise BadSample("missing_file", where, f"{path!r}: {err}") from err
        if not exists:
            raise BadSample("missing_file", where, str(path))
    try:
        with _pil_bomb_check_off():
            image = Image.open(path)  # reads the header only
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadSample(
                    "image_too_large",
                    where,
                    f"{path}: {width}x{height} = {width * height:,} pixels > data.max_image_pixels = {max_pixels:,}",
                )
            if width == 0 or height == 0:
                raise BadSample("unreadable_image", where, f"{path}: {width}x{height} image")
            image.load()
            return convert(image)
    except BadSample:
        raise
    except Image.DecompressionBombError as err:  # a later frame of a multi-frame file
        raise BadSample("image_too_large", where, f"{path}: {err}") from err
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, MemoryError...
        raise BadSample("unreadable_image", where, f"{path}: {type(err).__name__}: {err}") from err


def open_image(path: str | Path | io.BytesIO, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    return _read(path, where, to_rgb, max_pixels)


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


def _mask_pixels(image: Image.Image, where: str) -> np.ndarray:
    if image.format in LOSSY_MASK_FORMATS:
        # JPEG ringing puts values between 0 and 255 along every edge and may leave specks far
        # from it; thresholding would move the boundary by an amount nobody chose.
        raise BadSample("lossy_mask", where, f"{image.format} file; store masks as PNG or RLE")
    return np.asarray(ImageOps.exif_transpose(image))


def open_mask(path: str | Path | io.BytesIO, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    where = f"{where} ({Path(path).name})" if not isinstance(path, io.BytesIO) else where
    return mask_from_array(_read(path, where, lambda image: _mask_pixels(image, where), max_pixels), where)


def is_int_value(value) -> bool:
    """An integer from JSON or numpy; not a bool (Python counts True as 1, a JSON true is no count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def rle_string_counts(counts: str | bytes) -> np.ndarray:
    """The run lengths (int64) a COCO compressed RLE string encodes, as pycocotools'
    rleFrString reads them: 5 bits per character offset by 48, a continuation bit 0x20, a sign
    bit 0x10 on a value's last character, counts from the fourth on stored as differences to
    the count two before. Vectorised (a Python loop took longer than pycocotools' decode).
    Raises ValueError where the C decoder would read past the end or overflow."""
    data = counts.encode("latin-1") if isinstance(counts, str) else bytes(counts)
    codes = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    bad = np.flatnonzero((codes < 0) | (codes > 63))
    if bad.size:
        raise ValueError(f"character {data[bad[0] : bad[0] + 1]!r} at {bad[0]} is not an RLE character ('0'..'o')")
    if codes.size == 0:
        return codes
    last = (codes & 0x20) == 0  # a value's last character
    if not last[-1]:
        raise ValueError(f"string ends inside count {int(last.sum())}")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits: beyond any mask (and beyond the C decoder's long)
        raise ValueError(f"count {int(np.argmax(lengths > 12))} has {int(lengths.max())} characters")
    shift = 5 * (np.arange(codes.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((codes & 0x1F) << shift, starts)
    values -= np.where(codes[ends] & 0x10, 1 << (5 * lengths), 0)
    # x[i] += x[i - 2] for i >= 3: two running sums, over the odd and the even positions from 2
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def validate_rle(rle, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Check a COCO RLE completely before any decoder sees it, or raise BadSample
    (malformed_record / image_too_large): `size` two ints >= 1, `counts` a list of ints >= 0 or
    a compressed string, whose runs sum to exactly H x W. pycocotools checks none of it:
    negative counts overflow, short or empty counts decode to a wrong (partly uninitialised)
    mask. Returns (height, width)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise BadSample("malformed_record", where, "an RLE must be an object with 'size' and 'counts'")
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int_value(v) for v in size)):
        raise BadSample("malformed_record", where, f"RLE size must be [height, width] integers, got {size!r}"[:200])
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise BadSample("malformed_record", where, f"RLE size {height}x{width} is empty")
    if height * width > max_pixels:
        raise BadSample(
            "image_too_large",
            where,
            f"RLE mask {height}x{width} = {height * width:,} pixels > data.max_image_pixels = {max_pixels:,}",
        )
    if isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_counts(counts)
        except (ValueError, UnicodeEncodeError) as err:
            raise BadSample("malformed_record", where, f"bad compressed RLE counts: {err}") from err
    elif isinstance(counts, list):
        wrong = [i for i, v in enumerate(counts) if not is_int_value(v)]
        if wrong:
            raise BadSample(
                "malformed_record",
                where,
                f"RLE counts must be integers; entry {wrong[0]} is {counts[wrong[0]]!r}"[:200],
            )
        try:
            runs = np.array(counts, dtype=np.int64).reshape(-1)
        except OverflowError as err:
            raise BadSample("malformed_record", where, f"an RLE count does not fit 64 bits ({err})") from err
    else:
        raise BadSample(
            "malformed_record",
            where,
            f"RLE counts must be a list of integers or a compressed string, got {type(counts).__name__}",
        )
    negative = np.flatnonzero(runs < 0)
    if negative.size:
        raise BadSample("malformed_record", where, f"RLE count {negative[0]} is negative ({runs[negative[0]]})")
    # a Python int sum: counts near 2**63 must not wrap around to H x W
    if sum(runs.tolist()) != height * width:
        raise BadSample(
            "malformed_record",
            where,
            f"RLE counts sum to {sum(runs.tolist())}, size {height}x{width} needs {height * width}",
        )
    return height, width


def decode_rle(rle: dict, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool [H, W], validated first."""
    from pycocotools import mask as mask_utils

    height, width = validate_rle(rle, where, max_pixels)
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects(
            {"size": [height, width], "counts": [int(v) for v in counts]}, height, width
        )
    else:
        compressed = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(compressed).astype(bool)


def check_pair(image: Image.Image, mask: np.ndarray, where: str, min_pixels: int) -> None:
    if mask.shape != (image.height, image.width):
        raise BadSample(
            "size_mismatch", where, f"mask {mask.shape[1]}x{mask.shape[0]}, image {image.width}x{image.height}"
        )
    if int(mask.sum()) < min_pixels:
        raise BadSample("empty_mask", where, f"{int(mask.sum())} pixels < {min_pixels}")


NORMALISE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def image_tensor(image: Image.Image, size: int, normalise_dtype: str = "float32") -> torch.Tensor:
    """Direct (aspect-ignoring) bicubic resize to size x size, ImageNet-normalised [3, size, size].

    `normalise_dtype`: the arithmetic of the normalisation. float32 (the tensor is float32), or
    bfloat16 as the official Sa2VA inference normalises SAM2's input (its `preprocess_image`
    with bf16 mean and std, after casting the uint8 pixels to bf16): each of /255, -mean, /std
    rounded to bf16, which differs from float32 normalisation cast to bf16 by up to one bf16 step.
    """
    if normalise_dtype not in NORMALISE_DTYPES:
        raise ValueError(f"normalise_dtype must be one of {sorted(NORMALISE_DTYPES)}, got {normalise_dtype!r}")
    resized = image.resize((size, size), Image.BICUBIC)
    if normalise_dtype == "bfloat16":
        dtype = NORMALISE_DTYPES[normalise_dtype]
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).to(dtype)
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype).view(3, 1, 1)
        return (pixels / 255.0 - mean) / std
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
