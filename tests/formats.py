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
    {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "sentences": ["the big square", "square on the left"]},
    {"ref_id": 2, "ann_id": 102, "image_id": 1, "split": "val", "sentences": ["the bar at the bottom"]},
    {"ref_id": 3, "ann_id": 103, "image_id": 2, "split": "testA", "sentences": ["the box", "box in the middle", "middle thing"]},
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
    annotations = [{"id": POLYGON_ANN[0], "image_id": POLYGON_ANN[1], "segmentation": POLYGON_ANN[2], "iscrowd": 0, "category_id": 1}]
    annotations += [{"id": ann_id, "image_id": image_id, "segmentation": rle_of(mask, compressed=ann_id == 102), "iscrowd": 0, "category_id": 1}
                    for ann_id, (image_id, mask) in MASKS.items()]
    instances = {"images": [{"id": i, "file_name": n, "height": h, "width": w} for i, (n, h, w) in IMAGES.items()],
                 "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    refs, sent_id = [], 0
    for ref in REFS:
        sentences = []
        for text in ref["sentences"]:
            sentences.append({"tokens": text.split(), "raw": text.capitalize(), "sent_id": sent_id, "sent": text})
            sent_id += 1
        refs.append({**ref, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences], "category_id": 1,
                     "file_name": IMAGES[ref["image_id"]][0].replace(".jpg", f"_{ref['ann_id']}.jpg")})
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
        lines.append(json.dumps({"image1": f"img{i}.png", "mask1": f"img{i}_mask.png", "image2": f"img{i}.png", "mask2": f"img{i}_mask.png", "caption": caption}))
        rows.append({"image": {"bytes": image_png, "path": None}, "mask": {"bytes": png_bytes(mask.astype(np.uint8) * 255), "path": None},
                     "mask_rle": rle_of(mask), "mask_polygon": [[left, top, left + 20, top, left + 20, top + 16, left, top + 16]],
                     "mask_json": json.dumps(rle_of(mask)), "caption": caption})
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, rows


def hf_dataset(rows):
    """A datasets.Dataset of `rows` with image and mask as Image features (PNG bytes)."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "mask": datasets.Image(),
        "mask_rle": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
        "mask_polygon": datasets.List(datasets.List(datasets.Value("float64"))),
        "mask_json": datasets.Value("string"), "caption": datasets.Value("string"),
    })
    return datasets.Dataset.from_list(rows, features=features)
