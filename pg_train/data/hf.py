"""Hugging Face datasets as a pair source (`data.source=hf`).

`data.hf_path` is a `save_to_disk` folder, a folder (or file) of parquet / arrow files, or a
hub name (needs the network). Columns are mapped by name (`data.hf_image`, `hf_mask`,
`hf_caption`, optional `hf_image2` / `hf_mask2`); a mask may be PNG bytes (or an `Image`
feature), a COCO RLE dict, polygons ([[x0, y0, x1, y1, ...], ...]) or either as a JSON string.
Images are read with datasets' decoding off and decoded here, so a corrupt image is a counted
bad row (`unreadable_image`), not an exception inside datasets.

Map-style (default): rows are read by index, so the loader's machinery is the manifest's
exactly — the (seed, epoch) permutation, rank shards, refill of a bad row by the next, resume.
Streaming (`data.hf_streaming=true`): rows arrive in order; `HFStreamPairs` answers `load(i)`
from a forward window over the stream, so the same loader (`StreamingPairLoader`, positions in
stream order) shards, refills and resumes the same way. Shuffling there is datasets' seeded
buffer shuffle, reseeded per epoch (the order is deterministic for a (seed, epoch), not a full
permutation); a resumed run re-reads the stream up to its position.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .augment import second_view
from .coco import annotation_mask
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_pair, decode_rle, mask_from_array, open_image, open_mask, to_rgb
from .loader import PairLoader
from .types import BadSample, RawPair

DATA_SUFFIXES = (".parquet", ".arrow")
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Columns:
    image: str = "image"
    mask: str = "mask"
    caption: str | None = "caption"
    image2: str | None = None
    mask2: str | None = None

    def __post_init__(self):
        if (self.image2 is None) != (self.mask2 is None):
            raise ValueError("data.hf_image2 and data.hf_mask2 go together (set both or neither)")

    def images(self) -> list[str]:
        return [c for c in (self.image, self.image2) if c]

    def required(self) -> list[str]:
        return [c for c in (self.image, self.mask, self.image2, self.mask2) if c]


def _cell_source(value, where: str) -> io.BytesIO | str:
    """An image cell (datasets' {"bytes", "path"} with decoding off, or raw bytes) as what
    images.open_image reads: the bytes in memory, else the file path."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise BadSample("malformed_record", where, "image cell holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    raise BadSample("malformed_record", where, f"an image cell must be bytes or an Image, got {type(value).__name__}")


def _caption(value, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]  # several expressions: the first (like coco_refs)
    raise BadSample(
        "malformed_record", where, f"caption must be a string (or a list of strings), got {type(value).__name__}"
    )


@dataclass(frozen=True)
class RowReader:
    """One dataset row -> RawPair, or BadSample naming the row and the column. Images and PNG
    masks go through images.open_image / open_mask (size checked before decoding, JPEG masks
    refused), RLE and polygons through the manifest's and COCO's decoders."""

    columns: Columns
    pairing: str = "augment"
    seed: int = 0
    min_pixels: int = 16
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.pairing not in ("same", "augment"):
            raise ValueError(f"data.pairing must be 'same' or 'augment' for data.source=hf, got {self.pairing!r}")

    def image(self, value, where: str) -> Image.Image:
        if isinstance(value, Image.Image):  # a dataset whose decoding could not be turned off
            return to_rgb(value)
        return open_image(_cell_source(value, where), where, self.max_pixels)

    def mask(self, value, size: tuple[int, int], where: str) -> np.ndarray:
        """PNG bytes / Image, RLE dict, polygons, or a JSON string of either -> bool [H, W]."""
        width, height = size
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise BadSample("malformed_record", where, f"mask string is not JSON (RLE or polygons): {err}") from err
        if isinstance(value, dict) and "counts" in value:
            return decode_rle(value, where, self.max_pixels)
        if isinstance(value, list):
            return annotation_mask(value, height, width, where, self.max_pixels)
        if value is None:
            raise BadSample("malformed_record", where, "mask is null")
        if isinstance(value, Image.Image):
            return mask_from_array(np.asarray(value), where)
        return open_mask(_cell_source(value, where), where, self.max_pixels)

    def pair(self, row: dict, where: str, index: int) -> RawPair:
        c = self.columns
        missing = [name for name in c.required() + ([c.caption] if c.caption else []) if name not in row]
        if missing:
            raise BadSample("malformed_record", where, f"missing column(s) {missing}; the row has {sorted(row)}")
        image1 = self.image(row[c.image], f"{where} {c.image}")
        mask1 = self.mask(row[c.mask], image1.size, f"{where} {c.mask}")
        check_pair(image1, mask1, f"{where} {c.image}/{c.mask}", self.min_pixels)
        if c.image2:
            image2 = self.image(row[c.image2], f"{where} {c.image2}")
            mask2 = self.mask(row[c.mask2], image2.size, f"{where} {c.mask2}")
            check_pair(image2, mask2, f"{where} {c.image2}/{c.mask2}", self.min_pixels)
        else:
            image2, mask2 = second_view(image1, mask1, self.pairing, self.seed, index, self.min_pixels)
        caption = _caption(row[c.caption], f"{where} {c.caption}") if c.caption else None
        return RawPair(image1, mask1, image2, mask2, caption, where)


# ---- opening -------------------------------------------------------------------------------------
def data_files(path: Path, split: str) -> list[Path]:
    """The parquet (else arrow) files of `path` (a file or a folder, searched recursively);
    those of `split` when file or folder names say (hub layout: train-00000-of-00002.parquet,
    data/train/...), else all of them."""
    if path.is_file():
        return [path]
    for suffix in DATA_SUFFIXES:
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if files:
            named = [
                f
                for f in files
                if f.name.startswith((f"{split}-", f"{split}.", f"{split}_")) or split in f.relative_to(path).parts[:-1]
            ]
            return named or files
    raise FileNotFoundError(f"{path}: no .parquet or .arrow files (and not a save_to_disk folder)")


def count_rows(files: list[Path]) -> int:
    """Rows in parquet files (footer metadata) or arrow files (record-batch headers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        if f.suffix == ".parquet":
            total += pq.ParquetFile(f).metadata.num_rows
        else:
            with pa.memory_map(str(f)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    total += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                    continue
                total += sum(batch.num_rows for batch in reader)
    return total


def open_hf_dataset(path: str, split: str = "train", streaming: bool = False, cache_dir: str | None = None):
    """(dataset, number of rows or None, a name for messages): a datasets.Dataset, or an
    IterableDataset when streaming."""
    import datasets

    local = Path(path)
    if local.is_dir() and any((local / m).is_file() for m in SAVE_TO_DISK_MARKERS):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{local}: no split {split!r} (data.hf_split); it has {sorted(ds)}")
            ds = ds[split]
        rows = len(ds)
        return (ds.to_iterable_dataset() if streaming else ds), rows, str(local)
    if local.exists():
        files = data_files(local, split)
        builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=streaming, cache_dir=cache_dir
        )
        return ds, (count_rows(files) if streaming else len(ds)), str(local)
    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as err:
        raise ValueError(
            f"data.hf_path={path!r} is not a local folder or file, and the hub could not provide it ({err})"
        ) from err
    info = getattr(ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    rows = splits[split].num_examples if split in splits else None
    return ds, (len(ds) if not streaming else rows), path


def _raw_images(ds, columns: Columns):
    """The dataset with media decoding off for the image columns (bytes come through)."""
    import datasets

    features = ds.features or {}
    if isinstance(ds, datasets.IterableDataset):
        return ds.decode(False)
    for name in columns.images() + [c for c in (columns.mask, columns.mask2) if c]:
        if isinstance(features.get(name), datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _check_columns(dataset, columns: Columns, name: str) -> None:
    """A mapped column the dataset lacks is a configuration error, found before training (a
    stream that does not state its columns is checked row by row instead)."""
    present = dataset.column_names
    absent = [
        c
        for c in columns.required() + ([columns.caption] if columns.caption else [])
        if present is not None and c not in present
    ]
    if absent:
        raise ValueError(
            f"{name}: column(s) {absent} not in the dataset (columns: {present}); set data.hf_image/hf_mask/hf_caption/..."
        )


class HFPairs:
    """A map-style datasets.Dataset: row i is sample i."""

    def __init__(self, dataset, reader: RowReader, name: str):
        _check_columns(dataset, reader.columns, name)
        self.dataset = _raw_images(dataset, reader.columns)
        self.reader, self.name = reader, name

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> RawPair:
        return self.reader.pair(self.dataset[index], f"{self.name} row {index}", index)


class HFStreamPairs:
    """A streaming IterableDataset behind the `load(index)` interface: position i of this
    epoch's stream is sample i. Reads forward, keeping the last `window` rows so a rank's
    interleaved requests and the loader's refills (a few rows ahead) are served without
    rereading; a request behind the window restarts the stream (the next epoch, a refill that
    wrapped around). Picklable for DataLoader workers (each keeps its own stream)."""

    def __init__(
        self,
        stream,
        num_rows: int,
        reader: RowReader,
        name: str,
        shuffle: bool = True,
        buffer_size: int = 1000,
        window: int = 256,
    ):
        _check_columns(stream, reader.columns, name)
        self.stream = _raw_images(stream, reader.columns)
        self.num_rows, self.reader, self.name = num_rows, reader, name
        self.shuffle, self.buffer_size, self.window = shuffle, buffer_size, window
        self.epoch = 0
        self.skipped = 0  # rows at the stream's head that are not this source's (a held-out carve-out)
        self._reset()

    def skip_rows(self, count: int) -> None:
        """Leave out the stream's first `count` rows (file order, before any shuffling): they
        are the run's held-out set (data/heldout.py)."""
        self.skipped += count
        self.num_rows -= count
        self._reset()

    def _reset(self) -> None:
        self._rows = None
        self._next = 0
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_rows=None, _next=0, _cache=OrderedDict())
        return state

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset()

    def __len__(self) -> int:
        return self.num_rows

    def _open(self):
        stream = self.stream.skip(self.skipped) if self.skipped else self.stream
        if self.shuffle:
            stream = stream.shuffle(seed=self.reader.seed, buffer_size=self.buffer_size)
            stream.set_epoch(self.epoch)  # datasets reseeds the buffer and shard order per epoch
        # iter(batch_size=...), not iter(stream): inside a DataLoader worker the latter hands each
        # worker only its share of the shards, and every position here must see the whole stream.
        for batch in stream.iter(batch_size=64):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield dict(zip(names, values))

    def _row(self, position: int) -> dict:
        if position in self._cache:
            return self._cache[position]
        if self._rows is None or position < self._next:
            self._reset()
            self._rows = self._open()
        while self._next <= position:
            try:
                row = next(self._rows)
            except StopIteration:
                raise ValueError(
                    f"{self.name}: the stream ended after {self._next} rows, but its length was given as {self.num_rows} "
                    "(data.hf_num_rows)"
                ) from None
            self._cache[self._next] = row
            self._next += 1
            if len(self._cache) > self.window:
                self._cache.popitem(last=False)
        return self._cache[position]

    def load(self, index: int) -> RawPair:
        where = f"{self.name} stream position {index} (epoch {self.epoch})"
        return self.reader.pair(self._row(index), where, index)


class StreamingPairLoader(PairLoader):
    """PairLoader over stream positions: rank r takes r, r+W, ... of the first W*floor(N/W)
    positions (the manifest's shards with shuffle off); the epoch reaches the source first, so
    a shuffled stream is reseeded per epoch. Resume, refill and skip counts are PairLoader's."""

    def shard(self, epoch: int) -> list[int]:
        self.dataset.source.set_epoch(epoch)
        usable = (len(self.dataset) // self.world_size) * self.world_size
        return list(range(usable))[self.rank :: self.world_size]


def build_hf_source(cfg, seed: int = 0, cache_dir: str | None = None):
    """HFPairs or HFStreamPairs for a DataConfig with source=hf."""
    if not cfg.hf_path:
        raise ValueError(
            "data.source=hf needs data.hf_path (a save_to_disk folder, parquet/arrow files, or a hub name)"
        )
    columns = Columns(cfg.hf_image, cfg.hf_mask, cfg.hf_caption, cfg.hf_image2, cfg.hf_mask2)
    reader = RowReader(columns, cfg.pairing, seed, cfg.min_pixels, cfg.max_image_pixels)
    ds, rows, name = open_hf_dataset(cfg.hf_path, cfg.hf_split, cfg.hf_streaming, cache_dir)
    if not cfg.hf_streaming:
        return HFPairs(ds, reader, name)
    rows = cfg.hf_num_rows or rows
    if not rows:
        raise ValueError(f"{name}: the stream does not state its length; set data.hf_num_rows")
    return HFStreamPairs(ds, rows, reader, name, cfg.shuffle, cfg.hf_shuffle_buffer)
