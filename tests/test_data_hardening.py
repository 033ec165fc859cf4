"""Every input format the data sources read, fed awkward and hostile input: a bad file is one
sample's problem (skipped and counted by a named reason, or in strict mode an error naming the
manifest line and field), never an exception of another type, never a silently wrong mask."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pg_train.data import REASONS, BadSample, CocoPairs, ManifestPairs, PairDataset, PairLoader, Preprocess
from pg_train.data.images import decode_rle

SMALL = Preprocess(mllm_size=448, sam_size=128)
WIDTH, HEIGHT = 64, 48
BOX = (10, 10, 30, 30)  # x0, y0, x1, y1 of the good masks' object


def png_bytes(width: int, height: int, *, bit_depth: int = 1, colour_type: int = 0, pixel_rows: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, so a header can claim any size without the pixels existing
    (a decompression bomb costs nothing to build)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel_rows)) + chunk(b"IEND", b"")
    )


def good_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    x0, y0, x1, y1 = BOX
    mask[y0:y1, x0:x1] = True
    return mask


def coco_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def list_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE, written out here (column-major runs, starting with background)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [mask.shape[0], mask.shape[1]], "counts": runs}


@pytest.fixture
def files(tmp_path):
    """A good image + mask, and every bad file the corpus refers to, in tmp_path."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    image.save(tmp_path / "good.png")
    Image.fromarray(good_mask().astype(np.uint8) * 255).save(tmp_path / "good_mask.png")
    good_png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (tmp_path / "header_only.png").write_bytes(good_png[:40])
    (tmp_path / "zero_bytes.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "zero_size.png").write_bytes(png_bytes(0, 0))
    (tmp_path / "bomb.png").write_bytes(png_bytes(20_000, 10_000))  # 200 M pixels: above PIL's error threshold
    (tmp_path / "big.png").write_bytes(png_bytes(10_000, 10_000))  # 100 M: PIL only warns, ours refuses
    (tmp_path / "garbage_pixels.png").write_bytes(
        png_bytes(WIDTH, HEIGHT, bit_depth=8, colour_type=2, pixel_rows=b"\x07" * 100)
    )
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8) + 255 * np.eye(32, dtype=np.uint8)).save(
        tmp_path / "small_mask.png"
    )
    Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.uint8)).save(tmp_path / "empty_mask.png")
    soft = good_mask().astype(np.uint8) * 255
    soft[0:5, 0:5] = 128
    Image.fromarray(soft).save(tmp_path / "soft_mask.png")
    Image.fromarray(good_mask().astype(np.uint8) * 255).save(tmp_path / "jpeg_mask.jpg", quality=100)
    mask_png = (tmp_path / "good_mask.png").read_bytes()
    (tmp_path / "truncated_mask.png").write_bytes(mask_png[: len(mask_png) // 2])
    return tmp_path


def record(**changes) -> dict:
    base = {
        "image1": "good.png",
        "mask1": "good_mask.png",
        "image2": "good.png",
        "mask2": "good_mask.png",
        "caption": "the object",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def line(**changes) -> bytes:
    return json.dumps(record(**changes)).encode()


def rle(**changes) -> dict:
    out = coco_rle(good_mask())
    out.update(changes)
    return out


# (case id, bad manifest line, reason it is counted under, what the strict error must name besides the line)
CORPUS = [
    # images
    ("image_missing", line(image2="nowhere.png"), "missing_file", "nowhere.png"),
    ("image_path_with_nul", line(image1="a\x00b.png"), "missing_file", "image1"),
    ("image_path_empty", line(image1=""), "malformed_record", "image1"),
    ("image_truncated_png", line(image1="truncated.png"), "unreadable_image", "truncated.png"),
    ("image_header_only", line(image1="header_only.png"), "unreadable_image", "header_only.png"),
    ("image_zero_bytes", line(image1="zero_bytes.png"), "unreadable_image", "zero_bytes.png"),
    ("image_text_file", line(image2="text.png"), "unreadable_image", "text.png"),
    ("image_zero_by_zero", line(image1="zero_size.png"), "unreadable_image", "zero_size.png"),
    ("image_corrupt_pixel_stream", line(image1="garbage_pixels.png"), "unreadable_image", "garbage_pixels.png"),
    ("image_decompression_bomb", line(image1="bomb.png"), "image_too_large", "bomb.png"),
    ("image_above_our_limit", line(image2="big.png"), "image_too_large", "big.png"),
    ("image_is_a_directory", line(image1="."), "missing_file", "image1"),
    # PNG masks
    ("mask_wrong_size", line(mask1="small_mask.png"), "size_mismatch", "image1/mask1"),
    ("mask_empty", line(mask2="empty_mask.png"), "empty_mask", "image2/mask2"),
    ("mask_soft_values", line(mask1="soft_mask.png"), "non_binary_mask", "soft_mask.png"),
    ("mask_jpeg", line(mask1="jpeg_mask.jpg"), "lossy_mask", "jpeg_mask.jpg"),
    ("mask_truncated_png", line(mask2="truncated_mask.png"), "unreadable_image", "truncated_mask.png"),
    ("mask_zero_bytes", line(mask2="zero_bytes.png"), "unreadable_image", "zero_bytes.png"),
    ("mask_bomb", line(mask1="bomb.png"), "image_too_large", "bomb.png"),
    ("mask_number", line(mask1=7), "malformed_record", "mask1"),
    ("mask_list", line(mask2=[1, 2]), "malformed_record", "mask2"),
    # RLE masks
    (
        "rle_negative_counts",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": [-1, HEIGHT * WIDTH + 1]}),
        "malformed_record",
        "negative",
    ),
    ("rle_short_counts", line(mask1={"size": [HEIGHT, WIDTH], "counts": [100, 50]}), "malformed_record", "sum to 150"),
    (
        "rle_long_counts",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH, 5]}),
        "malformed_record",
        "mask1",
    ),
    ("rle_empty_counts", line(mask1={"size": [HEIGHT, WIDTH], "counts": []}), "malformed_record", "sum to 0"),
    ("rle_empty_string", line(mask1={"size": [HEIGHT, WIDTH], "counts": ""}), "malformed_record", "sum to 0"),
    (
        "rle_float_counts",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": [1.5, HEIGHT * WIDTH - 1.5]}),
        "malformed_record",
        "integers",
    ),
    (
        "rle_string_in_counts",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": ["3", HEIGHT * WIDTH - 3]}),
        "malformed_record",
        "integers",
    ),
    (
        "rle_bool_counts",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": [True, HEIGHT * WIDTH - 1]}),
        "malformed_record",
        "integers",
    ),
    ("rle_counts_object", line(mask1={"size": [HEIGHT, WIDTH], "counts": {"a": 1}}), "malformed_record", "counts"),
    ("rle_missing_counts", line(mask1={"size": [HEIGHT, WIDTH]}), "malformed_record", "mask1"),
    (
        "rle_size_three_numbers",
        line(mask1={"size": [HEIGHT, WIDTH, 3], "counts": [HEIGHT * WIDTH]}),
        "malformed_record",
        "size",
    ),
    (
        "rle_size_negative",
        line(mask1={"size": [-HEIGHT, -WIDTH], "counts": [HEIGHT * WIDTH]}),
        "malformed_record",
        "size",
    ),
    ("rle_size_strings", line(mask1={"size": ["48", "64"], "counts": [HEIGHT * WIDTH]}), "malformed_record", "size"),
    (
        "rle_size_other_than_image",
        line(mask2={"size": [10, 10], "counts": [40, 20, 40]}),
        "size_mismatch",
        "image2/mask2",
    ),
    ("rle_huge_size", line(mask1={"size": [100_000, 100_000], "counts": [10**10]}), "image_too_large", "100000x100000"),
    (
        "rle_string_bad_characters",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": "~~~~"}),
        "malformed_record",
        "RLE character",
    ),
    (
        "rle_string_ends_mid_count",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": "P"}),
        "malformed_record",
        "ends inside",
    ),
    (
        "rle_string_of_another_size",
        line(mask1={"size": [HEIGHT, WIDTH], "counts": "0c0"}),
        "malformed_record",
        "sum to",
    ),
    # JSON lines
    ("json_list_not_object", b'["good.png", "good_mask.png"]', "malformed_record", "JSON object"),
    ("json_number", b"42", "malformed_record", "JSON object"),
    ("json_null", b"null", "malformed_record", "JSON object"),
    ("json_syntax", b'{"image1": "good.png", "mask1": ', "malformed_record", "invalid JSON"),
    ("json_deep_nesting", b"[" * 100_000 + b"]" * 100_000, "malformed_record", "invalid JSON"),
    ("json_not_utf8", b'{"image1": "\xff\xfe.png"}', "malformed_record", "UTF-8"),
    ("json_missing_keys", line(mask2=DROP, image2=DROP), "malformed_record", "image2"),
    ("json_image_number", line(image1=5), "malformed_record", "image1"),
    ("json_image_object", line(image2={"path": "good.png"}), "malformed_record", "image2"),
    ("json_caption_number", line(caption=5), "malformed_record", "caption"),
]


def write_manifest(directory: Path, bad: bytes, good: int = 3) -> Path:
    """`good` good lines with the bad one as line 2."""
    lines = [line(caption=f"object {i}") for i in range(good)]
    lines.insert(1, bad)
    path = directory / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("case, bad, reason, named", CORPUS, ids=[c[0] for c in CORPUS])
def test_adversarial_manifest_input_is_skipped_by_reason_or_named_in_strict_mode(files, case, bad, reason, named):
    assert reason in REASONS
    path = write_manifest(files, bad)
    source = ManifestPairs(path)
    assert len(source) == 4

    # The source: BadSample (our type), the reason, the file and line, the field or file.
    with pytest.raises(BadSample) as err:
        source.load(1)
    assert err.value.reason == reason, str(err.value)
    assert f"{path}:2" in str(err.value) and named in str(err.value), str(err.value)

    # Lenient: the batch is still full, of good samples, and the bad line is counted once.
    loader = PairLoader(PairDataset(source, SMALL), batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert len(batch["indices"]) == 4 and loader.skip_counts == {reason: 1}
    # every mask in the batch is the good one (3,072 px, 20x20 foreground) at 128x128: 400/3072 of it
    coverage = batch["masks2"].sum(dim=(1, 2)) / 128**2
    torch.testing.assert_close(coverage, torch.full((4,), 400 / 3072), rtol=1e-4, atol=1e-4)

    # Strict: the error names the manifest line.
    strict = PairLoader(PairDataset(source, SMALL, strict=True), batch_size=4, shuffle=False)
    with pytest.raises(BadSample, match="manifest.jsonl:2"):
        next(iter(strict))


def test_decompression_bomb_is_a_bad_sample_not_a_crash(files):
    """A header claiming 200 M pixels (PIL raises DecompressionBombError, the old code let it
    end the run): skipped as image_too_large in lenient mode, named in strict mode."""
    path = write_manifest(files, line(image1="bomb.png"))
    loader = PairLoader(PairDataset(ManifestPairs(path), SMALL), batch_size=4, shuffle=False)
    assert len(next(iter(loader))["indices"]) == 4
    assert loader.skip_counts == {"image_too_large": 1}
    strict = PairLoader(PairDataset(ManifestPairs(path), SMALL, strict=True), batch_size=4, shuffle=False)
    with pytest.raises(
        BadSample,
        match=r"manifest\.jsonl:2 image1.*bomb\.png: 20000x10000 = 200,000,000 pixels > data\.max_image_pixels",
    ):
        next(iter(strict))


def test_decompression_bomb_limit_is_data_max_image_pixels(files):
    """The limit is ours, not PIL's: 64x48 = 3,072 pixels loads at a limit of 3,072 and is
    refused at 3,071, from the header alone."""
    path = write_manifest(files, line())
    assert ManifestPairs(path, max_pixels=WIDTH * HEIGHT).load(1).image1.size == (WIDTH, HEIGHT)
    with pytest.raises(BadSample, match="3,072 pixels > data.max_image_pixels = 3,071") as err:
        ManifestPairs(path, max_pixels=WIDTH * HEIGHT - 1).load(1)
    assert err.value.reason == "image_too_large"


def test_decompression_bomb_limit_from_the_config(files):
    from pg_train.config import ConfigError, load_config
    from pg_train.data import build_source

    path = write_manifest(files, line())
    cfg = load_config(
        [], ["data.source=manifest", f"data.manifest={path}", f"data.max_image_pixels={WIDTH * HEIGHT - 1}"]
    )
    with pytest.raises(BadSample) as err:
        build_source(cfg.data).load(0)
    assert err.value.reason == "image_too_large"
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        load_config([], ["data.max_image_pixels=0"])


BAD_RLES = {
    "negative_counts": {"size": [HEIGHT, WIDTH], "counts": [-5, HEIGHT * WIDTH + 5]},
    "short_counts": {"size": [HEIGHT, WIDTH], "counts": [100, 50]},
    "empty_counts": {"size": [HEIGHT, WIDTH], "counts": []},
    "long_counts": {"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH, 1]},
    "empty_string": {"size": [HEIGHT, WIDTH], "counts": ""},
    "short_string": {"size": [HEIGHT, WIDTH], "counts": "0c0"},  # runs [0, 19]: 19 of 3,072 pixels
    "string_mid_count": {"size": [HEIGHT, WIDTH], "counts": "P"},
    "string_bad_character": {"size": [HEIGHT, WIDTH], "counts": "0\x7f"},
    "size_zero": {"size": [0, 0], "counts": []},
    "string_count_of_70_bits": {"size": [HEIGHT, WIDTH], "counts": "0" + "P" * 13 + "0"},
    "list_count_beyond_64_bits": {"size": [HEIGHT, WIDTH], "counts": [2**70, HEIGHT * WIDTH - 2**70]},
}


@pytest.mark.parametrize("name", sorted(BAD_RLES))
def test_rle_validation_refuses_before_decoding(name):
    """pycocotools decodes a short or empty RLE into a wrong mask and overflows on negative
    counts; each must be malformed_record naming where it came from."""
    with pytest.raises(BadSample) as err:
        decode_rle(BAD_RLES[name], "pairs.jsonl:7 mask1")
    assert err.value.reason == "malformed_record" and "pairs.jsonl:7 mask1" in str(err.value)


@pytest.mark.parametrize("form", ["compressed", "list"])
def test_exact_rle_masks_still_decode_after_validation(form):
    """Validation must not refuse a correct RLE: both forms decode to the mask they encode,
    including one that starts with foreground (a leading zero run)."""
    mask = good_mask()
    mask[0, 0] = True
    encoded = coco_rle(mask) if form == "compressed" else list_rle(mask)
    assert (decode_rle(encoded, "here") == mask).all()


def test_rle_validation_string_decoder_matches_pycocotools():
    """The validator's reading of compressed counts against pycocotools' own encoder, on
    random masks of random sizes: the runs it finds rebuild the mask exactly."""
    from pycocotools import mask as mask_utils

    from pg_train.data.images import rle_string_counts

    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((height, width)) < rng.random()
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_string_counts(encoded["counts"])
        rebuilt = np.concatenate([np.full(n, i % 2, dtype=bool) for i, n in enumerate(runs)]).reshape(width, height).T
        assert (rebuilt == mask).all()


# Line breaks to str.splitlines() that JSON allows raw inside a string (the C0 ones it also
# breaks on, \x0b \x0c \x1c-\x1e, JSON forbids raw and json.dumps escapes).
SEPARATORS = {"LS": "\u2028", "PS": "\u2029", "NEL": "\u0085"}


@pytest.mark.parametrize("name", sorted(SEPARATORS))
def test_jsonl_line_separators_inside_a_caption_are_text(files, name):
    """str.splitlines() breaks on these; JSON allows them raw inside strings. The caption is
    kept whole, the record count is right and a later bad line keeps its line number."""
    caption = f"left{SEPARATORS[name]}right"
    lines = [
        json.dumps(record(caption=caption), ensure_ascii=False).encode(),
        line(caption="two"),
        b'{"broken": ',
        line(caption="four"),
    ]
    path = files / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = ManifestPairs(path)
    assert len(source) == 4
    assert source.load(0).caption == caption
    with pytest.raises(BadSample, match=r"manifest\.jsonl:3\b"):
        source.load(2)
    assert source.load(3).caption == "four"


def test_jsonl_line_separators_bom_and_crlf(files):
    """A UTF-8 BOM before the first record and Windows line ends are accepted; blank lines
    keep the numbering of the lines after them."""
    path = files / "manifest.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(caption="one") + b"\r\n\r\n" + line(caption="three") + b"\r\n" + b"[1]\r\n")
    source = ManifestPairs(path)
    assert len(source) == 3
    assert [source.load(i).caption for i in (0, 1)] == ["one", "three"]
    with pytest.raises(BadSample, match=r"manifest\.jsonl:4\b"):
        source.load(2)


# COCO instances files: the polygon and RLE forms an annotation may take.
COCO_CASES = {
    "polygon_four_numbers": ([[10, 10, 30, 30]], "malformed_record"),
    "polygon_odd_length": ([[10, 10, 30, 10, 30]], "malformed_record"),
    "polygon_strings": ([["10", "10", "30", "10", "30", "30"]], "malformed_record"),
    "polygon_nan": ([[10, 10, 30, 10, float("nan"), 30]], "malformed_record"),
    "polygon_empty_list": ([], "malformed_record"),
    "segmentation_number": (5, "malformed_record"),
    "rle_negative": ({"size": [HEIGHT, WIDTH], "counts": [-1, HEIGHT * WIDTH + 1]}, "malformed_record"),
    "rle_short_string": ({"size": [HEIGHT, WIDTH], "counts": "0c0"}, "malformed_record"),
}


@pytest.mark.parametrize("name", sorted(COCO_CASES))
def test_adversarial_coco_annotation_is_a_bad_sample(files, name):
    segmentation, reason = COCO_CASES[name]
    good = [[10, 10, 30, 10, 30, 30, 10, 30]]
    instances = {
        "images": [{"id": 1, "file_name": "good.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": good},
            {"id": 2, "image_id": 1, "segmentation": segmentation},
        ],
    }
    (files / "instances.json").write_text(json.dumps(instances))
    source = CocoPairs(files / "instances.json", files, pairing="same")
    assert source.load(0).mask1.sum() > 0
    with pytest.raises(BadSample) as err:
        source.load(1)
    assert err.value.reason == reason and "annotation 2" in str(err.value)


def test_unforeseen_decoder_failure_is_counted_as_load_error(files, monkeypatch):
    """A failure nobody listed (here: the RLE decoder raising a bare Exception) is still one
    sample's problem: load_error, naming the line."""
    import pg_train.data.images as images

    def broken_decode(*args, **kwargs):
        raise Exception("input type is not supported.")

    monkeypatch.setattr(images, "validate_rle", broken_decode)
    path = write_manifest(files, line(mask1=rle()))
    with pytest.raises(BadSample, match=r"manifest\.jsonl:2.*Exception: input type is not supported") as err:
        ManifestPairs(path).load(1)
    assert err.value.reason == "load_error"


def test_lossy_mask_is_refused_even_when_its_values_look_binary(files):
    """A JPEG of a solid black image decodes to exact zeros, one of white to 255: binary-looking,
    but lossy masks are refused by format, not by luck."""
    Image.fromarray(np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)).save(files / "white.jpg", quality=100)
    assert set(np.unique(np.asarray(Image.open(files / "white.jpg")))) == {255}
    path = write_manifest(files, line(mask1="white.jpg"))
    with pytest.raises(BadSample) as err:
        ManifestPairs(path).load(1)
    assert err.value.reason == "lossy_mask" and "white.jpg" in str(err.value)


def test_hand_built_png_is_a_real_png():
    """The corpus' hand-built PNG is a real PNG (so the bomb cases test the size, not a parse error)."""
    rows = b"".join(b"\x00" + bytes([255]) for _ in range(8))  # 8x8 1-bit rows, filter 0
    image = Image.open(io.BytesIO(png_bytes(8, 8, pixel_rows=rows)))
    image.load()
    assert image.size == (8, 8)


def test_any_source_failure_is_counted_not_fatal(files):
    """A source of another kind (here a stub whose third sample raises ZeroDivisionError) gets
    the same guarantee from the dataset: load_error counted, or named in strict mode."""
    manifest = ManifestPairs(write_manifest(files, line()))

    class Flaky:
        def __len__(self):
            return len(manifest)

        def load(self, index):
            if index == 2:
                raise ZeroDivisionError("division by zero in a decoder")
            return manifest.load(index)

    loader = PairLoader(PairDataset(Flaky(), SMALL), batch_size=4, shuffle=False)
    assert len(next(iter(loader))["indices"]) == 4 and loader.skip_counts == {"load_error": 1}
    with pytest.raises(BadSample, match=r"Flaky sample 2.*ZeroDivisionError: division by zero in a decoder"):
        next(iter(PairLoader(PairDataset(Flaky(), SMALL, strict=True), batch_size=4, shuffle=False)))
