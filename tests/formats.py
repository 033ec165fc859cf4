"""Small fixtures written in exactly the formats the datasets are distributed in: the refer
toolkit's instances.json + refs(unc).p, and the boxes whose masks the tests know by construction."""

import json
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def box_mask(height, width, top, bottom, left, right):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def rle_of(mask, compressed=True):
    """COCO RLE of a bool mask: compressed (counts a string, as instances.json stores it) or
    uncompressed (counts a list of run lengths, column-major)."""
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    runs, current, length = [], False, 0
    for value in mask.flatten(order="F"):
        if bool(value) != current:
            runs.append(length)
            current, length = bool(value), 0
        length += 1
    runs.append(length)
    return {"size": list(mask.shape), "counts": runs}


# image id -> (file name, height, width); the masks each annotation has
IMAGES = {1: ("COCO_train2014_000000000001.jpg", 64, 64), 2: ("COCO_train2014_000000000002.jpg", 48, 64)}
MASKS = {
    102: (1, box_mask(64, 64, 40, 56, 16, 48)),  # RLE, compressed
    103: (2, box_mask(48, 64, 10, 30, 20, 40)),  # RLE, uncompressed
}
POLYGON_ANN = (101, 1, [[8, 8, 40, 8, 40, 40, 8, 40]])  # a square from (8, 8) to (40, 40)
REFS = [
    {
        "ref_id": 1,
        "ann_id": 101,
        "image_id": 1,
        "split": "train",
        "sentences": ["the big square", "square on the left"],
    },
    {"ref_id": 2, "ann_id": 102, "image_id": 1, "split": "val", "sentences": ["the bar at the bottom"]},
    {
        "ref_id": 3,
        "ann_id": 103,
        "image_id": 2,
        "split": "testA",
        "sentences": ["the box", "box in the middle", "middle thing"],
    },
    {"ref_id": 4, "ann_id": 999, "image_id": 1, "split": "train", "sentences": ["an object nobody annotated"]},
]


def write_refer(root, protocol=2):
    """<root>/refcoco/{instances.json, refs(unc).p} and <root>/train2014/*.jpg; returns
    (refer_dir, image folder). The refs pickle is the refer toolkit's structure, written with
    the standard library (protocol 2, as the released Python 2 pickles)."""
    refer_dir, images = root / "refcoco", root / "train2014"
    refer_dir.mkdir(parents=True)
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id, (name, height, width) in IMAGES.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / name, quality=95)
    annotations = [
        {
            "id": POLYGON_ANN[0],
            "image_id": POLYGON_ANN[1],
            "segmentation": POLYGON_ANN[2],
            "iscrowd": 0,
            "category_id": 1,
        }
    ]
    annotations += [
        {
            "id": ann_id,
            "image_id": image_id,
            "segmentation": rle_of(mask, compressed=ann_id == 102),
            "iscrowd": 0,
            "category_id": 1,
        }
        for ann_id, (image_id, mask) in MASKS.items()
    ]
    instances = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, (n, h, w) in IMAGES.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    refs, sent_id = [], 0
    for ref in REFS:
        sentences = []
        for text in ref["sentences"]:
            sentences.append({"tokens": text.split(), "raw": text.capitalize(), "sent_id": sent_id, "sent": text})
            sent_id += 1
        refs.append(
            {
                **ref,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "category_id": 1,
                "file_name": IMAGES[ref["image_id"]][0].replace(".jpg", f"_{ref['ann_id']}.jpg"),
            }
        )
    with open(refer_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    return refer_dir, images


# ---- pairs as a JSONL manifest and as a Hugging Face dataset with the same rows -------------------
def png_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(root, count=7, bad_row=1):
    """`count` pairs (image, box mask, caption) as PNG files + manifest.jsonl, row `bad_row`'s
    image truncated. Returns (manifest path, rows): each row holds the image's PNG bytes, the
    mask as PNG bytes, RLE and polygon, and the caption, in manifest order."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows, lines = [], []
    for i in range(count):
        height, width = 40, 48 + 4 * i
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        top, left = 4 + i, 6 + i
        mask = box_mask(height, width, top, top + 16, left, left + 20)
        image_png = png_bytes(image)
        if i == bad_row:
            image_png = image_png[: len(image_png) // 3]
        (root / f"img{i}.png").write_bytes(image_png)
        (root / f"img{i}_mask.png").write_bytes(png_bytes(mask.astype(np.uint8) * 255))
        caption = f"object number {i}"
        lines.append(
            json.dumps(
                {
                    "image1": f"img{i}.png",
                    "mask1": f"img{i}_mask.png",
                    "image2": f"img{i}.png",
                    "mask2": f"img{i}_mask.png",
                    "caption": caption,
                }
            )
        )
        rows.append(
            {
                "image": {"bytes": image_png, "path": None},
                "mask": {"bytes": png_bytes(mask.astype(np.uint8) * 255), "path": None},
                "mask_rle": rle_of(mask),
                "mask_polygon": [[left, top, left + 20, top, left + 20, top + 16, left, top + 16]],
                "mask_json": json.dumps(rle_of(mask)),
                "caption": caption,
            }
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, rows


def hf_dataset(rows):
    """A datasets.Dataset of `rows` with image and mask as Image features (PNG bytes)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "mask_rle": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
            "mask_polygon": datasets.List(datasets.List(datasets.Value("float64"))),
            "mask_json": datasets.Value("string"),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


# ---- video: a DAVIS-style folder with palette PNGs, an SA-V-style per-video JSON ------------------
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128] + [0] * (3 * 250)


def davis_object(video, obj, t, height=40, width=56):
    """The mask of object `obj` in frame t (moving boxes, each id its own place)."""
    if video == "bear":
        return (
            box_mask(height, width, 4 + t, 14 + t, 4 + 2 * t, 16 + 2 * t)
            if obj == 1
            else box_mask(height, width, 20, 34, 30 + t, 50 + t)
        )
    return box_mask(height, width, 10, 30, 10 + 3 * t, 25 + 3 * t)


# video -> (frame count, {object id: frames it appears in}); bear's object 2 leaves in frame 3
DAVIS_VIDEOS = {"bear": (4, {1: range(4), 2: range(3)}), "car": (3, {5: range(3)})}


def write_davis(root, resolution="480p"):
    """root/JPEGImages/480p/<video>/00000.jpg and root/Annotations/480p/<video>/00000.png (mode P,
    pixel value = object id), as DAVIS 2017 ships them."""
    rng = np.random.default_rng(2)
    for video, (count, objects) in DAVIS_VIDEOS.items():
        frames, annotations = root / "JPEGImages" / resolution / video, root / "Annotations" / resolution / video
        frames.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for t in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(frames / f"{t:05d}.jpg")
            ids = np.zeros((40, 56), dtype=np.uint8)
            for obj, present in objects.items():
                if t in present:
                    ids[davis_object(video, obj, t)] = obj
            png = Image.fromarray(ids, mode="P")
            png.putpalette(DAVIS_PALETTE)
            png.save(annotations / f"{t:05d}.png")
    return root


def sav_object(obj, k, height=32, width=48):
    return box_mask(height, width, 2 + 2 * k, 12 + 2 * k, 5 + obj * 20, 15 + obj * 20)


def write_sav(root, ann_every=4):
    """root/JPEGImages/sav_000001/{00000,00004,00008}.jpg and root/sav_000001_manual.json: 3
    annotated frames x masklets 0 and 1; masklet 1 is empty (gone) in the last frame."""
    frames = root / "JPEGImages" / "sav_000001"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(3)
    masklet = []
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(frames / f"{k * ann_every:05d}.jpg")
        masklet.append(
            [rle_of(sav_object(obj, k) if (obj, k) != (1, 2) else np.zeros((32, 48), dtype=bool)) for obj in (0, 1)]
        )
    record = {
        "video_id": "sav_000001",
        "video_frame_count": 9,
        "video_height": 32,
        "video_width": 48,
        "masklet": masklet,
        "masklet_id": [0, 1],
        "masklet_num": 2,
        "masklet_type": ["manual", "manual"],
    }
    (root / "sav_000001_manual.json").write_text(json.dumps(record))
    return root
