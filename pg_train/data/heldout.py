"""A run's held-out set: named in the config's `eval:` section, or carved out of its training data.

Every source gets one, so in-training evaluation, `pg-train-evaluate` and the report measure
the model on the run's own kind of data, never on pairs it trained on:

- synthetic: scenes of another seed (`eval.seed`, default the run's seed + 10,000), drawn like
  the training scenes (sizes, colours, object counts); the training scenes are untouched.
- named (`eval.manifest`: a second manifest, for any source; `eval.split`: another split of a
  refer pickle (`val`, `testA`, ...) or of a Hugging Face dataset (`validation`, `test`);
  `eval.video_dir`: a second folder of videos): the training data is untouched.
- carved, when the run evaluates (`eval_every > 0`) and names no set: whole groups of samples
  leave the training data, so no image (manifest: a line's image1; coco / refer: an image id;
  video: a video) is on both sides. Groups are taken in the order of the SHA-1 of their key
  until `n` samples are held out, n = min(eval_samples, max(2, a fifth of the samples)); the
  choice depends on the data alone (not on the seed, the rank or the number of ranks), so every
  rank, a resumed run and `pg-train-evaluate` agree on it. Hugging Face rows have no image key:
  each row is its own group (map-style), and a stream holds out its first n rows in file order
  (`skip(n)` before the training stream is shuffled, `take(n)` for the held-out set).
A refer held-out set is read as RefCOCO is evaluated (every sentence, image 2 = image 1, masks
at the image's resolution: `protocol == "refcoco"`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

HELDOUT_SEED_OFFSET = 10_000  # synthetic held-out scenes: seed + this (training uses small seeds)


@dataclass
class EvalConfig:
    """The `eval:` section: where the held-out set comes from (nothing set: see the module)."""

    manifest: str | None = None  # a JSONL manifest of held-out pairs (any data.source)
    split: str | None = None  # refer: a refs split (val, testA, ...); hf: a split of data.hf_path
    video_dir: str | None = None  # video: a folder of held-out videos (data.video_dir's layout)
    video_annotations: str | None = None  # its annotations (default <eval.video_dir>/Annotations)
    seed: int | None = None  # synthetic: the held-out scenes' seed (default: the run's seed + 10,000)


@dataclass
class HeldOut:
    """The held-out pairs (a source: `__len__`, `load(i)`) and what they are, as eval.json,
    metrics.jsonl and the report say it: {"source", "split", "n"} plus how it was chosen."""

    source: object
    description: dict = field(default_factory=dict)
    protocol: str = "pairs"  # pairs | refcoco (masks scored at each image's resolution)

    def label(self) -> str:
        d = self.description
        return f"{d['source']} {d['split']}, n={d['n']}"


class Subset:
    """The samples `indices` of a source, renumbered 0..len-1 (a carve-out's training or
    held-out side); loading, and what a bad sample names, are the source's."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.source.load(self.indices[index])


# ---- carving ---------------------------------------------------------------------------------------
def carve_count(total: int, wanted: int) -> int:
    """How many samples a carve-out holds out: min(wanted, max(2, total // 5))."""
    return min(wanted, max(2, total // 5))


def carve(keys: list[str], wanted: int, what: str) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of samples with group `keys`: whole groups, in the
    order of their keys' SHA-1, until carve_count(len(keys), wanted) samples are held out."""
    count = carve_count(len(keys), wanted)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    held: set[int] = set()
    for key in sorted(groups, key=lambda k: hashlib.sha1(k.encode()).hexdigest()):
        if len(held) >= count:
            break
        held.update(groups[key])
    train = [i for i in range(len(keys)) if i not in held]
    if not train or len(held) < 2:
        raise ValueError(
            f"{what}: {len(keys)} samples in {len(groups)} groups are too few to carve a held-out set of {count} "
            "out of the training data; name one in the config's eval: section (eval.manifest, eval.split, ...)"
        )
    return train, sorted(held)


def manifest_keys(source) -> list[str]:
    """A manifest line's group: its image1 path (a one-image line: its image; lines that do not
    parse: their own group)."""
    keys = []
    for number, raw in source.lines:
        try:
            record = json.loads(raw.decode("utf-8"))
            keys.append(f"image:{record['image1'] if 'image1' in record else record['image']}")
        except (ValueError, KeyError, TypeError):
            keys.append(f"line:{number}")
    return keys


def refer_keys(source) -> list[str]:
    """A refer sample's group: its ref's image id (every sentence of a ref, every ref of an image)."""
    return [f"image:{source.refs[e.ref_index].get('image_id', f'ref{e.ref_index}')}" for e in source.entries]


def group_keys(source) -> list[str]:
    """Each sample's group key (see the module docstring), by the source's kind."""
    from .coco import CocoPairs
    from .manifest import ManifestPairs
    from .refer import ReferPairs
    from .video import VideoPairs

    if isinstance(source, ManifestPairs):
        return manifest_keys(source)
    if isinstance(source, CocoPairs):
        return [f"image:{a.get('image_id')}" for a in source.annotations]
    if isinstance(source, ReferPairs):
        return refer_keys(source)
    if isinstance(source, VideoPairs):
        return [f"video:{p.video}" for p in source.pairs]
    return [f"row:{i}" for i in range(len(source))]  # hf map-style: a row is its own group


# ---- the run's split ---------------------------------------------------------------------------------
def _refer_for_evaluation(data, split: str | None, seed: int):
    """A refer split read as RefCOCO is evaluated: every sentence, the image with itself, every
    annotated mask however small."""
    from .refer import ReferPairs

    return ReferPairs(
        data.refer_dir,
        data.coco_images,
        data.refer_split_by,
        split,
        per="sentence",
        pairing="same",
        seed=seed,
        min_pixels=0,
        max_pixels=data.max_image_pixels,
    )


def _view(source, entries):
    view = copy.copy(source)
    view.entries = entries
    return view


def named_heldout(data, ev: EvalConfig, seed: int) -> HeldOut | None:
    """The held-out set the `eval:` section names, or None when it names none."""
    from . import build_source
    from .manifest import ManifestPairs

    if ev.manifest:
        source = ManifestPairs(ev.manifest, min_pixels=data.min_pixels, max_pixels=data.max_image_pixels)
        return HeldOut(source, {"source": "manifest", "split": str(ev.manifest), "n": len(source), "chosen": "named"})
    if ev.split:
        if data.source == "refer":
            source = _refer_for_evaluation(data, ev.split, seed)
            description = {"source": "refer", "split": f"{source.refs_path.name} {ev.split}", "n": len(source)}
            return HeldOut(source, {**description, "chosen": "named"}, protocol="refcoco")
        if data.source == "hf":
            _check_own_files(data, ev.split)
            source = build_source(dataclasses.replace(data, hf_split=ev.split, shuffle=False, hf_num_rows=None), seed)
            description = {"source": "hf", "split": f"{data.hf_path} {ev.split}", "n": len(source), "chosen": "named"}
            return HeldOut(source, description)
        raise ValueError(f"eval.split names a split of data.source=refer or hf, not of data.source={data.source}")
    if ev.video_dir:
        source = build_source(
            dataclasses.replace(data, source="video", video_dir=ev.video_dir, video_annotations=ev.video_annotations),
            seed,
        )
        return HeldOut(source, {"source": "video", "split": str(ev.video_dir), "n": len(source), "chosen": "named"})
    return None


def _check_own_files(data, split: str) -> None:
    """The files of `split` and of the training split must differ: a folder whose file names do
    not mention a split is read whole for it (hf.data_files falls back to every file), the
    training rows included."""
    from pathlib import Path

    from .hf import SAVE_TO_DISK_MARKERS, data_files

    path = Path(data.hf_path)
    if not path.is_dir() or any((path / m).is_file() for m in SAVE_TO_DISK_MARKERS):
        return
    shared = set(data_files(path, split)) & set(data_files(path, data.hf_split))
    if shared:
        raise ValueError(
            f"eval.split={split!r}: {path} has no files of that split apart from data.hf_split={data.hf_split!r}'s "
            f"(file or folder names such as {split}-00000-of-00001.parquet or {split}/...): {sorted(shared)[0]} "
            "would be read by both"
        )


def synthetic_heldout(data, ev: EvalConfig, seed: int, samples: int) -> HeldOut:
    """Scenes of the held-out seed drawn like `data`'s (a DataConfig of source=synthetic), from
    its first scene whatever the training data.sample_offset."""
    from . import build_source

    heldout_seed = ev.seed if ev.seed is not None else seed + HELDOUT_SEED_OFFSET
    source = build_source(dataclasses.replace(data, num_samples=samples, sample_offset=0), seed=heldout_seed)
    return HeldOut(source, {"source": "synthetic", "split": f"seed {heldout_seed}", "n": len(source), "chosen": "seed"})


def split_run_data(data, ev: EvalConfig, seed: int, samples: int, carve_out: bool) -> tuple[object, HeldOut]:
    """(the training source, the held-out set) of a run (see _split); the set's description
    says n = the samples evaluated (at most `samples`) and how many it has (`available`)."""
    train, heldout = _split(data, ev, seed, samples, carve_out)
    heldout.description.update(n=min(samples, len(heldout.source)), available=len(heldout.source))
    return train, heldout


def _split(data, ev: EvalConfig, seed: int, samples: int, carve_out: bool) -> tuple[object, HeldOut]:
    """(the training source, the held-out set) of a run: `data` (DataConfig), `ev` (EvalConfig),
    the run's seed, eval_samples, and whether a carve-out applies (the run evaluates:
    eval_every > 0). Without a carve-out, an unnamed held-out set of real data is still the
    carve rule's choice, but the training source keeps every sample: `description["trained_on"]`
    then says the run saw those samples."""
    from . import build_source

    train = build_source(data, seed)
    if data.source == "synthetic" and not ev.manifest:
        return train, synthetic_heldout(data, ev, seed, samples)
    named = named_heldout(data, ev, seed)
    if named is not None:
        return train, named
    what = f"data.source={data.source}"
    if data.source == "hf" and data.hf_streaming:
        return _carve_stream(data, seed, samples, carve_out, train)
    keys = group_keys(train)
    train_idx, held_idx = carve(keys, samples, what)
    if data.source == "refer":  # the held-out images' sentences, read as RefCOCO is evaluated
        held_images = {keys[i] for i in held_idx}
        full = _refer_for_evaluation(data, data.refer_split, seed)
        heldout_source = _view(full, [e for e, k in zip(full.entries, refer_keys(full)) if k in held_images])
        protocol = "refcoco"
    else:
        heldout_source, protocol = Subset(train, held_idx), "pairs"
    description = {
        "source": data.source,
        "split": f"carved from the training data ({len({keys[i] for i in held_idx})} of {len(set(keys))} groups)",
        "n": len(heldout_source),
        "chosen": "carved",
    }
    if carve_out:
        train = (
            _view(train, [train.entries[i] for i in train_idx]) if data.source == "refer" else Subset(train, train_idx)
        )
    else:
        description["trained_on"] = True
    return train, HeldOut(heldout_source, description, protocol)


def _carve_stream(data, seed: int, samples: int, carve_out: bool, train) -> tuple[object, HeldOut]:
    """A stream's first n rows (file order) held out; the training stream skips them."""
    from .hf import HFStreamPairs

    count = carve_count(len(train), samples)
    if len(train) - count < 1 or count < 2:
        raise ValueError(
            f"data.source=hf: a stream of {len(train)} rows is too short to carve {count} held-out rows; name a "
            "held-out set in the config's eval: section (eval.split)"
        )
    heldout_source = HFStreamPairs(
        train.stream.take(count), count, train.reader, f"{train.name} (held out)", shuffle=False, window=count
    )
    description = {
        "source": "hf",
        "split": f"the stream's first {count} rows (carved from the training data)",
        "n": count,
        "chosen": "carved",
    }
    if carve_out:
        train.skip_rows(count)
    else:
        description["trained_on"] = True
    return train, HeldOut(heldout_source, description)
