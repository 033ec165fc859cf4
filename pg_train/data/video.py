"""Video frame pairs (`data.source=video`, `data.pairing=other_frame`): the same object in two
frames of a video, `data.video_frame_distance` annotated frames apart.

Layouts (`data.video_dir`):

    JPEGImages/<video>/<frame>.jpg         (DAVIS keeps them under JPEGImages/480p/: found by itself)
    Annotations/<video>/<frame>.png        DAVIS / YouTube-VOS / MOSE: palette PNGs, index = object id
    <annotations>/<video>_manual.json      SA-V: "masklet" [annotated frame][object] COCO RLE, "masklet_id";
                                           annotated frame k is JPEGImages/<video>/<k * sav_ann_every:05d>.jpg

The index is built once from the annotations (every mask read for its object ids): one pair per
(video, frame t, object present in t) with frame t + distance. An object absent from the other
frame makes no pair and is counted (`absent_in_other_frame`); an annotation that cannot be read
becomes one bad sample (`malformed_record` / `unreadable_image`, skipped and counted by the loader).
Captions are None: the teacher captions the region.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# _read: the package's one checked way of reading an image file (header size check first)
from .images import DEFAULT_MAX_IMAGE_PIXELS, _read, check_pair, decode_rle, open_image
from .types import BadSample, RawPair

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
DAVIS_RESOLUTIONS = ("480p", "Full-Resolution")


def object_ids(path: Path, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An annotation PNG -> int array [H, W] of object ids (0 = background): palette or grey
    indices as stored; a colour PNG's colours packed as 0xRRGGBB (each colour one object).
    Read through images._read: missing, oversized and unreadable files are counted bad samples."""
    array = _read(path, where, np.asarray, max_pixels)
    if array.ndim == 3:
        rgb = array[..., :3].astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return array.astype(np.int64)


def _resolution_dir(folder: Path) -> Path:
    """DAVIS's JPEGImages/480p (or Full-Resolution) when the folder holds only those."""
    entries = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if entries and all(p.name in DAVIS_RESOLUTIONS for p in entries):
        return folder / next(r for r in DAVIS_RESOLUTIONS if (folder / r).is_dir())
    return folder


@dataclass(frozen=True)
class FramePair:
    video: str
    frame1: str  # frame name (file stem)
    frame2: str
    object_id: int
    masks: tuple | None = None  # SA-V: the two RLEs; DAVIS: None (read from the PNGs)
    problem: tuple[str, str] | None = None  # (reason, detail) of an entry that cannot load


class VideoPairs:
    def __init__(
        self,
        video_dir: str | Path,
        annotations: str | Path | None = None,
        frame_distance: int = 5,
        sav_ann_every: int = 4,
        min_pixels: int = 16,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if frame_distance < 1:
            raise ValueError(f"data.video_frame_distance must be >= 1, got {frame_distance}")
        self.root = Path(video_dir)
        self.frames_dir = _resolution_dir(self.root / "JPEGImages")
        if not self.frames_dir.is_dir():
            raise FileNotFoundError(f"{self.root}: no JPEGImages/<video>/ frame folders")
        self.annotations_dir = _resolution_dir(Path(annotations) if annotations else self.root / "Annotations")
        if not self.annotations_dir.is_dir():
            raise FileNotFoundError(
                f"annotations folder {self.annotations_dir} does not exist (data.video_annotations)"
            )
        self.distance, self.ann_every, self.min_pixels, self.max_pixels = (
            frame_distance,
            sav_ann_every,
            min_pixels,
            max_pixels,
        )
        self.pairs: list[FramePair] = []
        self.absent_in_other_frame = 0
        sav_files = sorted(self.annotations_dir.glob("*_manual.json"))
        self.layout = "sa-v" if sav_files else "davis"
        if sav_files:
            for path in sav_files:
                self._index_sav(path)
        else:
            for folder in sorted(p for p in self.annotations_dir.iterdir() if p.is_dir()):
                self._index_davis(folder)
        if not self.pairs:
            raise ValueError(
                f"{self.annotations_dir}: no object appears in two frames {frame_distance} annotated frames apart "
                f"({self.absent_in_other_frame} absent in the other frame)"
            )

    def _add(
        self, video: str, frames: list[str], present: list[set[int] | tuple[str, str]], masks: list[dict] | None = None
    ) -> None:
        """Pairs (t, t + distance) of every object present in t. `present[k]`: the object ids
        in annotated frame k, or (reason, detail) when its annotation cannot be read; `masks[k]`
        (SA-V): object id -> RLE."""
        for k in range(len(frames) - self.distance):
            first, second = present[k], present[k + self.distance]
            if isinstance(first, tuple) or isinstance(second, tuple):
                self.pairs.append(
                    FramePair(
                        video,
                        frames[k],
                        frames[k + self.distance],
                        -1,
                        problem=first if isinstance(first, tuple) else second,
                    )
                )
                continue
            for obj in sorted(first):
                if obj not in second:
                    self.absent_in_other_frame += 1
                    continue
                rles = (masks[k][obj], masks[k + self.distance][obj]) if masks else None
                self.pairs.append(FramePair(video, frames[k], frames[k + self.distance], obj, rles))

    def _index_davis(self, folder: Path) -> None:
        pngs = sorted(folder.glob("*.png"))
        present = []
        for png in pngs:
            try:
                ids = np.unique(object_ids(png, str(png), self.max_pixels))
                present.append({int(i) for i in ids if i != 0})
            except BadSample as err:
                present.append((err.reason, err.detail))
        self._add(folder.name, [p.stem for p in pngs], present)

    def _index_sav(self, path: Path) -> None:
        from pycocotools import mask as mask_utils

        video = path.name[: -len("_manual.json")]
        try:
            data = json.loads(path.read_text())
            masklets, ids = data["masklet"], data["masklet_id"]
            present, masks = [], []
            for k, frame in enumerate(masklets):
                if len(frame) != len(ids):
                    raise ValueError(f"annotated frame {k} has {len(frame)} masks for {len(ids)} masklet_id")
                by_id = {int(obj): rle for obj, rle in zip(ids, frame)}
                masks.append(by_id)
                present.append({obj for obj, rle in by_id.items() if mask_utils.area(_rle_bytes(rle)) > 0})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            # the whole file is unusable: one bad sample that names it (skipped and counted)
            self.pairs.append(
                FramePair(video, "?", "?", -1, problem=("malformed_record", f"{path}: {type(err).__name__}: {err}"))
            )
            return
        frames = [f"{k * self.ann_every:05d}" for k in range(len(masklets))]
        self._add(video, frames, present, masks)

    def __len__(self) -> int:
        return len(self.pairs)

    def _frame(self, video: str, frame: str, where: str):
        for suffix in FRAME_SUFFIXES:
            path = self.frames_dir / video / f"{frame}{suffix}"
            if path.is_file():
                return open_image(path, where, self.max_pixels)
        raise BadSample("missing_file", where, str(self.frames_dir / video / f"{frame}.jpg"))

    def _mask(self, pair: FramePair, which: int, where: str) -> np.ndarray:
        if pair.masks is not None:
            return decode_rle(pair.masks[which], where, self.max_pixels)
        frame = pair.frame1 if which == 0 else pair.frame2
        return object_ids(self.annotations_dir / pair.video / f"{frame}.png", where, self.max_pixels) == pair.object_id

    def load(self, index: int) -> RawPair:
        pair = self.pairs[index]
        where = f"{self.annotations_dir / pair.video} frames {pair.frame1}->{pair.frame2} object {pair.object_id}"
        if pair.problem is not None:
            raise BadSample(pair.problem[0], where, pair.problem[1])
        image1, image2 = self._frame(pair.video, pair.frame1, where), self._frame(pair.video, pair.frame2, where)
        mask1, mask2 = self._mask(pair, 0, f"{where} (frame 1)"), self._mask(pair, 1, f"{where} (frame 2)")
        check_pair(image1, mask1, f"{where} (frame 1)", self.min_pixels)
        check_pair(image2, mask2, f"{where} (frame 2)", self.min_pixels)
        return RawPair(image1, mask1, image2, mask2, None, where)


def _rle_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
