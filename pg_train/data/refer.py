"""RefCOCO / RefCOCO+ / RefCOCOg as the refer toolkit distributes them.

    <refer_dir>/instances.json     COCO images + annotations (polygons or RLE)
    <refer_dir>/refs(unc).p        refcoco, refcoco+ (also refs(google).p for refcoco/refcocog)
    <refer_dir>/refs(umd).p        refcocog (umd split: train / val / test)

A refs pickle is a list of dicts {"ref_id", "ann_id", "image_id", "split", "sentences":
[{"sent", "raw", "tokens", "sent_id"}, ...], ...}: built-in containers and scalars only. It is
read through `RestrictedUnpickler`, which refuses every global, so a crafted pickle is an error
naming the file and never runs code. Images come from the COCO train2014 folder
(`file_name` of instances.json's images).

One pair per (ref, sentence) (`per="sentence"`: every expression is a sample, as the field
evaluates) or per ref (`per="ref"`: one sentence of the ref, drawn from (seed, index)); every
sentence of a ref stays available through `sentences(index)`.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .augment import augmented_view
from .coco import annotation_mask
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_pair, open_image
from .types import BadSample, RawPair

SPLIT_BYS = ("unc", "umd", "google")
SPLITS = ("train", "val", "testA", "testB", "testC", "test")


class ReferFormatError(ValueError):
    """A refer-toolkit file that cannot be used as a whole (not one sample): names the file."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles built-in containers and scalars only. Every global (class, function,
    copyreg extension) goes through `find_class`, so refusing it there leaves no path to
    constructing or calling anything: no `__reduce__` payload can run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refused global {module}.{name} (only built-in containers and scalars are allowed)"
        )


def load_refs_pickle(path: str | Path) -> list[dict]:
    """The refs list of a refer-toolkit pickle, or ReferFormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs pickle {path} does not exist")
    try:
        # Python 2 pickles (the released ones) hold byte strings: decode them as UTF-8.
        refs = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="utf-8").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        UnicodeDecodeError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise ReferFormatError(f"{path}: not a refer-toolkit refs pickle ({type(err).__name__}: {err})") from err
    if not isinstance(refs, list):
        raise ReferFormatError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def find_refs_file(refer_dir: str | Path, split_by: str | None) -> Path:
    """refs(<split_by>).p in `refer_dir`; without `split_by`, the only refs(*).p there."""
    refer_dir = Path(refer_dir)
    if split_by is not None:
        if split_by not in SPLIT_BYS:
            raise ValueError(f"data.refer_split_by must be one of {SPLIT_BYS}, got {split_by!r}")
        return refer_dir / f"refs({split_by}).p"
    found = sorted(refer_dir.glob("refs(*).p"))
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise ValueError(f"{refer_dir}: set data.refer_split_by (refs pickles found: {names})")
    return found[0]


def read_instances(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) of a COCO instances.json; a syntax error names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instances file {path} does not exist")
    try:
        data = json.loads(path.read_text())
        images = {img["id"]: img for img in data["images"]}
        annotations = {ann["id"]: ann for ann in data["annotations"]}
    except json.JSONDecodeError as err:
        raise ReferFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    except (KeyError, TypeError) as err:
        raise ReferFormatError(
            f"{path}: expected {{'images': [{{'id', ...}}], 'annotations': [{{'id', ...}}]}} ({err!r})"
        ) from err
    return images, annotations


def _sentence_texts(ref: dict) -> list[str]:
    sentences = ref.get("sentences")
    if not isinstance(sentences, list):
        return []
    texts = [s.get("sent") or s.get("raw") for s in sentences if isinstance(s, dict)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


@dataclass(frozen=True)
class ReferEntry:
    """One sample: the ref's position in the pickle, the sentence index (None: drawn per ref),
    and why it cannot load (None when it can)."""

    ref_index: int
    sentence: int | None
    problem: str | None = None


class ReferPairs:
    def __init__(
        self,
        refer_dir: str | Path,
        image_root: str | Path,
        split_by: str | None = None,
        split: str | None = "train",
        per: str = "sentence",
        pairing: str = "augment",
        seed: int = 0,
        min_pixels: int = 16,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if per not in ("sentence", "ref"):
            raise ValueError(f"data.refer_pairs must be 'sentence' or 'ref', got {per!r}")
        if pairing not in ("same", "augment"):
            raise ValueError(f"data.pairing must be 'same' or 'augment' for data.source=refer, got {pairing!r}")
        self.refer_dir = Path(refer_dir)
        self.refs_path = find_refs_file(self.refer_dir, split_by)
        self.instances_path = self.refer_dir / "instances.json"
        self.image_root = Path(image_root)
        self.pairing, self.seed, self.min_pixels, self.max_pixels, self.per = pairing, seed, min_pixels, max_pixels, per
        self.images, self.annotations = read_instances(self.instances_path)
        refs = load_refs_pickle(self.refs_path)
        self.splits = sorted({r.get("split") for r in refs if isinstance(r, dict) and isinstance(r.get("split"), str)})
        if split is not None:
            self._check_split(split)
        self.split = split
        self.refs: list[dict] = []
        self.entries: list[ReferEntry] = []
        for position, ref in enumerate(refs):
            if not isinstance(ref, dict):
                self.entries.append(
                    ReferEntry(len(self.refs), None, f"ref #{position} is a {type(ref).__name__}, not a dict")
                )
                self.refs.append({})
                continue
            if split is not None and ref.get("split") != split:
                continue
            texts = _sentence_texts(ref)
            problem = self._problem(ref, texts)
            index = len(self.refs)
            self.refs.append(ref)
            if problem is not None or per == "ref":
                self.entries.append(ReferEntry(index, None, problem))
            else:
                self.entries += [ReferEntry(index, s) for s in range(len(texts))]

    def _problem(self, ref: dict, texts: list[str]) -> str | None:
        if not texts:
            return "no sentence with a 'sent' string"
        if ref.get("ann_id") not in self.annotations:
            return f"ann_id {ref.get('ann_id')!r} not in {self.instances_path.name}"
        image_id = self.annotations[ref["ann_id"]].get("image_id")
        if image_id not in self.images:
            return f"image_id {image_id!r} not in {self.instances_path.name} images"
        missing = [k for k in ("file_name", "height", "width") if k not in self.images[image_id]]
        if missing:
            return f"image {image_id!r} in {self.instances_path.name} lacks {missing}"
        return None

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.refs_path}: no ref has split {split!r}; its splits are {self.splits}")

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, split: str) -> "ReferPairs":
        """The samples of one split, sharing this source's parsed files (instances.json of
        RefCOCO is tens of MB: read it once for all splits)."""
        self._check_split(split)
        view = copy.copy(self)
        view.split = split
        view.entries = [e for e in self.entries if self.refs[e.ref_index].get("split") == split]
        return view

    def _where(self, entry: ReferEntry) -> str:
        ref = self.refs[entry.ref_index]
        return f"{self.refs_path} ref_id {ref.get('ref_id', '?')}" + (
            f" sentence {entry.sentence}" if entry.sentence is not None else ""
        )

    def sentences(self, index: int) -> list[str]:
        """Every expression of sample `index`'s ref."""
        return _sentence_texts(self.refs[self.entries[index].ref_index])

    def caption(self, index: int) -> str:
        entry = self.entries[index]
        texts = self.sentences(index)
        if entry.sentence is not None:
            return texts[entry.sentence]
        draw = np.random.default_rng(np.random.SeedSequence([self.seed, index, 2])).integers(len(texts))
        return texts[int(draw)]

    def load_target(self, index: int) -> tuple:
        """(image, mask, caption, where) at the image's own resolution; BadSample if unusable."""
        entry = self.entries[index]
        where = self._where(entry)
        if entry.problem is not None:
            raise BadSample("malformed_record", where, entry.problem)
        ann = self.annotations[self.refs[entry.ref_index]["ann_id"]]
        info = self.images[ann["image_id"]]
        image = open_image(self.image_root / info["file_name"], where, self.max_pixels)
        mask = annotation_mask(ann.get("segmentation"), info["height"], info["width"], where, self.max_pixels)
        check_pair(image, mask, where, self.min_pixels)
        return image, mask, self.caption(index), where

    def load(self, index: int) -> RawPair:
        image, mask, caption, where = self.load_target(index)
        if self.pairing == "same":
            image2, mask2 = image, mask
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, index, 1]))
            image2, mask2 = augmented_view(image, mask, rng, min_pixels=self.min_pixels)
        return RawPair(image, mask, image2, mask2, caption, where)
