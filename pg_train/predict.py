"""Use a model: segment an image from a text, or caption a region and segment from that caption.

    pg-train-predict MODEL --image IMG (--text "the red circle" | --region MASK.png) [--out DIR]
    pg-train-predict MODEL --images FOLDER --text "the red circle" --out DIR
    pg-train-predict MODEL --manifest INPUTS.jsonl --out DIR

MODEL is an exported model directory (`pg-train-export`), a training checkpoint of any layout
or a run directory (its newest checkpoint; `--weights` picks the EMA teacher or the student).

- `--text`: referring segmentation; the mask of what the text describes.
- `--region`: the model captions the region (a binary PNG the image's size), then segments the
  image from its own caption (the cycle Pseudo-Gumbel trains): the caption says what the model
  sees there, the mask where it finds it again.

A manifest has one JSON object a line: {"image": "a.jpg", "text": "..."} or {"image": "a.jpg",
"region": "a_mask.png" | RLE}; paths relative to the manifest's folder ("caption" and "mask" are
read as "text" and "region"). A line with both (a one-image training manifest's line) is
segmented from its text, and the mask's IoU with the region is reported. For every input OUT gets `NNNN_<name>_mask.png` (the mask at the
image's resolution), `NNNN_<name>_overlay.png` (the image with the region in yellow, the mask in
magenta and the caption under it), and `predictions.jsonl` one line: the caption, the mask's area in
pixels and as a fraction of the image, and the score (the mean predicted probability inside the
mask). A bad input (missing or corrupt file, a mask that is not binary or not the image's size,
a malformed line) is named on stderr, gets a line with its reason, and is skipped, as in training.
All predictions come from `pg_train.inference`, the path evaluation uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pair, decode_rle, open_image, open_mask
from .data.manifest import manifest_lines
from .data.types import BadSample, unforeseen_errors_as_bad_sample

COMMAND = "pg-train-predict"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Request:
    """One input: an image and either a text or a region (a PNG path or an RLE object)."""

    image: Path
    text: str | None
    region: object
    where: str


@dataclass
class Loaded:
    request: Request
    image: Image.Image
    region: np.ndarray | None


# ---- inputs --------------------------------------------------------------------------------------
def requests_from_args(args) -> list[Request]:
    """The inputs the command line names: one image, a folder's images, or a manifest's lines."""
    if args.manifest:
        return manifest_requests(Path(args.manifest))
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder}: not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [Request(p, args.text, args.region, str(p)) for p in files]
    return [Request(Path(args.image), args.text, args.region, args.image)]


def manifest_requests(path: Path) -> list[Request | BadSample]:
    """One Request per non-blank line, or the BadSample that line is (reported, then skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path} does not exist")
    out: list[Request | BadSample] = []
    for number, raw in manifest_lines(path.read_bytes()):
        where = f"{path}:{number}"
        try:
            with unforeseen_errors_as_bad_sample(where):
                out.append(_manifest_request(raw, path.parent, where))
        except BadSample as err:
            out.append(err)
    return out


def _manifest_request(raw: bytes, root: Path, where: str) -> Request:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BadSample("malformed_record", where, f"{type(err).__name__}: {err}"[:300]) from err
    if not isinstance(record, dict):
        raise BadSample("malformed_record", where, "a line must be a JSON object")
    image = record.get("image")
    text = record.get("text", record.get("caption"))
    region = record.get("region", record.get("mask"))
    if not isinstance(image, str) or not image:
        raise BadSample("malformed_record", where, "image must be a non-empty path string")
    if text is None and region is None:
        raise BadSample("malformed_record", where, "give a text (or caption) or a region (or mask)")
    if text is not None and not isinstance(text, str):
        raise BadSample("malformed_record", where, "text must be a string")
    if isinstance(region, str):
        region = root / region
    elif not isinstance(region, dict) and region is not None:
        raise BadSample("malformed_record", where, "region must be a PNG path or an RLE object")
    return Request(root / image, text, region, where)


def load(request: Request, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Loaded:
    """The image and region of a request, read as training reads them (BadSample naming the file)."""
    with unforeseen_errors_as_bad_sample(request.where):
        image = open_image(request.image, request.where, max_pixels)
        if request.region is None:
            return Loaded(request, image, None)
        if isinstance(request.region, dict):
            region = decode_rle(request.region, request.where, max_pixels)
        else:
            region = open_mask(request.region, request.where, max_pixels)
        check_pair(image, region, request.where, min_pixels=1)
        return Loaded(request, image, region)


# ---- pictures ------------------------------------------------------------------------------------
MASK_COLOUR = (255, 0, 255)  # magenta: no synthetic scene colour, rare in photos
REGION_COLOUR = (255, 215, 0)


def _outlined(picture: Image.Image, layer: np.ndarray, colour: tuple[int, int, int], fill: float) -> Image.Image:
    """`picture` with `layer` (bool, any size) tinted by `colour` and outlined in it (3 px)."""
    shape = Image.fromarray(np.asarray(layer, bool).astype(np.uint8) * 255).resize(
        picture.size, Image.Resampling.NEAREST
    )
    edge = ImageChops.subtract(shape.filter(ImageFilter.MaxFilter(3)), shape.filter(ImageFilter.MinFilter(5)))
    solid = Image.new("RGB", picture.size, colour)
    picture = Image.composite(solid, picture, shape.point(lambda v: int(v * fill)))
    return Image.composite(solid, picture, edge)


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    region: np.ndarray | None,
    caption: str,
    width: int = 512,
    given_text: bool = False,
) -> Image.Image:
    """The image (scaled to `width`) with the region in yellow and the mask in magenta (tinted
    and outlined), the caption underneath. `given_text`: the caption was the query and the
    region a reference mask."""
    size = (width, max(1, round(image.height * width / image.width)))
    picture = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if region is not None:
        picture = _outlined(picture, region, REGION_COLOUR, 0.25)
    picture = _outlined(picture, mask, MASK_COLOUR, 0.35)
    if given_text:
        legend = "mask: magenta; text given" + ("; reference mask: yellow" if region is not None else "")
    else:
        legend = "mask: magenta; region: yellow; caption = the model's"
    lines = [caption[i : i + 80] for i in range(0, max(1, len(caption)), 80)][:3] + [legend]
    canvas = Image.new("RGB", (width, size[1] + 8 + 18 * len(lines)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, size[1] + 4 + 18 * i), line, fill="black" if i < len(lines) - 1 else "gray")
    return canvas


# ---- running -------------------------------------------------------------------------------------
def predict(model, loaded: list[Loaded], cfg=None) -> list:
    """inference.Prediction per input, batched by kind (texts together, regions together)."""
    from .inference import segment, segment_from_own_caption

    results: list = [None] * len(loaded)
    texts = [i for i, item in enumerate(loaded) if item.request.text is not None]
    regions = [i for i, item in enumerate(loaded) if item.request.text is None]
    if texts:
        found = segment(model, [loaded[i].image for i in texts], [loaded[i].request.text for i in texts], cfg)
        for i, p in zip(texts, found):
            results[i] = p
    if regions:
        found = segment_from_own_caption(
            model, [loaded[i].image for i in regions], [loaded[i].region for i in regions], cfg
        )
        for i, p in zip(regions, found):
            results[i] = p
    return results


def write_outputs(number: int, item: Loaded, prediction, out: Path) -> dict:
    """The mask PNG, the overlay PNG and the JSON record of one input. An input with a text and
    a mask (a training manifest's line) is segmented from the text; the mask is the reference
    its IoU is reported against."""
    stem = f"{number:04d}_{item.request.image.stem}"
    mask = np.asarray(prediction.mask, bool)
    given_text = item.request.text is not None
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
    overlay(item.image, mask, item.region, prediction.caption, given_text=given_text).save(out / f"{stem}_overlay.png")
    record = {"input": item.request.where, "image": str(item.request.image)}
    if given_text:
        record["text"] = item.request.text
    if item.region is not None:
        record["region"] = "rle" if isinstance(item.request.region, dict) else str(item.request.region)
    record.update(
        caption=prediction.caption,
        mask=f"{stem}_mask.png",
        overlay=f"{stem}_overlay.png",
        mask_area=int(mask.sum()),
        mask_fraction=float(mask.mean()),
        score=float(prediction.score),
    )
    if given_text and item.region is not None:
        union = int((mask | item.region).sum())
        record["iou_with_region"] = int((mask & item.region).sum()) / union if union else 1.0
    return record


def run(model, requests: list, out: Path, batch_size: int = 8, cfg=None) -> tuple[int, int]:
    """Predict every request into `out`, a predictions.jsonl line per input in input order
    (a skipped one: its reason and error); (written, skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with (out / "predictions.jsonl").open("w") as log:
        pending: list[tuple[int, Loaded | BadSample]] = []

        def flush() -> None:
            nonlocal written, skipped
            good = [item for _, item in pending if isinstance(item, Loaded)]
            predictions = iter(predict(model, good, cfg) if good else [])
            for number, item in pending:
                if isinstance(item, BadSample):
                    record = {"input": item.where, "skipped": item.reason, "error": str(item)}
                    skipped += 1
                else:
                    record = write_outputs(number, item, next(predictions), out)
                    print(json.dumps(record), flush=True)
                    written += 1
                log.write(json.dumps(record) + "\n")
            pending.clear()

        for number, request in enumerate(requests):
            try:
                if isinstance(request, BadSample):
                    raise request
                pending.append((number, load(request)))
            except BadSample as err:
                print(f"{COMMAND}: skipped {err}", file=sys.stderr)
                pending.append((number, err))
            if sum(isinstance(item, Loaded) for _, item in pending) >= batch_size:
                flush()
        flush()
    return written, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="an exported model directory, a training checkpoint or a run directory")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="one image")
    inputs.add_argument("--images", help="a folder of images (each with the same --text or --region)")
    inputs.add_argument("--manifest", help="JSONL: one {image, text | region} a line")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--text", help="segment what this text describes")
    query.add_argument(
        "--region", help="a binary mask PNG of the image's size: caption it, then segment from the caption"
    )
    parser.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--weights", choices=("ema", "student"), default="ema", help="for a training checkpoint")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if not args.manifest and args.text is None and args.region is None:
        parser.error("--image / --images need --text or --region")
    if args.manifest and (args.text is not None or args.region is not None):
        parser.error("--manifest lines carry their own text or region")
    if args.images and args.region is not None:
        parser.error("--region is one image's mask: use --image, or a manifest with a region per image")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    from .builders import load_checkpoint
    from .model.io.state_check import CheckpointError

    try:
        requests = requests_from_args(args)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = "student" if _is_model_directory(args.model) else args.weights
        model, cfg = load_checkpoint(args.model, device, command=COMMAND, weights=weights)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"{COMMAND}: error: {err}" if not str(err).startswith(COMMAND) else f"error: {err}", file=sys.stderr)
        return 2
    written, skipped = run(model, requests, Path(args.out), args.batch_size, cfg.objective if cfg else None)
    print(f"{COMMAND}: {written} predictions, {skipped} inputs skipped; wrote {Path(args.out) / 'predictions.jsonl'}")
    return 0 if written or not skipped else 1


def _is_model_directory(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


if __name__ == "__main__":
    sys.exit(main())
