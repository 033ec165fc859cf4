"""Training pairs (image1, mask1, image2, mask2, caption) from synthetic scenes, a JSONL
manifest or COCO/RefCOCO annotations, preprocessed for the MLLM and SAM2."""

from __future__ import annotations

from dataclasses import dataclass, field

from .coco import CocoPairs
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .loader import NoValidSamplesError, PairDataset, PairLoader, Preprocess, collate_pairs
from .manifest import ManifestPairs
from .synthetic import COLOURS, TEXTURES, SyntheticPairs
from .types import REASONS, BadSample, RawPair

SOURCES = ("synthetic", "manifest", "coco", "refer", "hf", "video")


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest | coco | refer | hf | video
    num_samples: int = 256  # synthetic: scenes per epoch
    # synthetic: the scenes are [sample_offset, sample_offset + num_samples) of the seed, so two
    # sources with disjoint ranges share no scene (e.g. a labelled and an unlabelled split)
    sample_offset: int = 0
    image_size: int = 448  # synthetic: canvas size
    sizes: list[str] = field(default_factory=lambda: ["tiny", "small", "medium", "large"])  # synthetic object sizes
    min_objects: int = 2  # synthetic: objects per scene
    max_objects: int = 5
    colours: list[str] | None = None  # synthetic: colour names to draw from (default: all 12)
    textures: list[str] | None = None  # synthetic: plain | striped | dotted | checkered (default: all)
    distinct_colours: bool = False  # synthetic: no two objects of a scene share a colour
    caption_style: str = "full"  # synthetic: full ("the large red square at the top") | colour_shape | colour
    manifest: str | None = None
    coco_instances: str | None = None
    coco_images: str | None = None
    coco_refs: str | None = None
    # refer: RefCOCO/+/g as the refer toolkit ships them; images from coco_images (train2014)
    refer_dir: str | None = None  # folder with instances.json and refs(unc|umd|google).p
    refer_split_by: str | None = None  # unc | umd | google; None: the only refs(*).p in refer_dir
    refer_split: str | None = "train"  # train | val | testA | testB | test; None: every ref
    refer_pairs: str = "sentence"  # sentence: a pair per (ref, sentence) | ref: a pair per ref
    # hf: a save_to_disk folder, a folder (or file) of parquet/arrow files, or a hub name (online)
    hf_path: str | None = None
    hf_split: str = "train"
    hf_image: str = "image"  # column names; a mask is PNG bytes/Image, an RLE dict or polygons
    hf_mask: str = "mask"
    hf_caption: str | None = "caption"
    hf_image2: str | None = None  # both or neither; without them image 2 follows data.pairing
    hf_mask2: str | None = None
    hf_streaming: bool = False  # read rows in order without the disk cache (shuffle: a seeded buffer)
    hf_shuffle_buffer: int = 1000
    hf_num_rows: int | None = None  # streaming: the row count when the dataset does not state it
    # video: JPEGImages/<video>/<frame>.jpg with Annotations/<video>/<frame>.png or SA-V JSON
    video_dir: str | None = None
    video_annotations: str | None = None  # default <video_dir>/Annotations; a folder of <video>_manual.json: SA-V
    video_frame_distance: int = 5  # annotated frames between image 1 and image 2
    sav_ann_every: int = 4  # SA-V: masklet k is frame k * sav_ann_every
    pairing: str = "augment"  # coco, refer, hf, synthetic: same | augment (an augmented view); video: other_frame
    min_pixels: int = 16
    # An image or mask with more pixels is skipped as image_too_large (checked from the file's
    # header before decoding); default 8192x8192 (README, "Data").
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    strict: bool = False
    num_workers: int = 0
    shuffle: bool = True


def build_source(cfg: DataConfig, seed: int = 0):
    if cfg.source == "synthetic":
        return SyntheticPairs(
            cfg.num_samples,
            seed=seed,
            image_size=cfg.image_size,
            min_pixels=cfg.min_pixels,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
            sizes=tuple(cfg.sizes),
            colours=tuple(cfg.colours or COLOURS),
            textures=tuple(cfg.textures or TEXTURES),
            distinct_colours=cfg.distinct_colours,
            pairing=cfg.pairing,
            sample_offset=cfg.sample_offset,
            caption_style=cfg.caption_style,
        )
    if cfg.source == "manifest":
        if not cfg.manifest:
            raise ValueError("data.source=manifest needs data.manifest=<path to .jsonl>")
        return ManifestPairs(cfg.manifest, cfg.min_pixels, cfg.max_image_pixels, cfg.pairing, seed)
    if cfg.source == "coco":
        if not (cfg.coco_instances and cfg.coco_images):
            raise ValueError("data.source=coco needs data.coco_instances and data.coco_images")
        return CocoPairs(
            cfg.coco_instances, cfg.coco_images, cfg.coco_refs, cfg.pairing, seed, cfg.min_pixels, cfg.max_image_pixels
        )
    if cfg.source == "refer":
        from .refer import ReferPairs

        if not (cfg.refer_dir and cfg.coco_images):
            raise ValueError("data.source=refer needs data.refer_dir and data.coco_images")
        return ReferPairs(
            cfg.refer_dir,
            cfg.coco_images,
            cfg.refer_split_by,
            cfg.refer_split,
            cfg.refer_pairs,
            cfg.pairing,
            seed,
            cfg.min_pixels,
            cfg.max_image_pixels,
        )
    if cfg.source == "hf":
        from .hf import build_hf_source

        return build_hf_source(cfg, seed)
    if cfg.source == "video":
        from .video import VideoPairs

        if not cfg.video_dir:
            raise ValueError("data.source=video needs data.video_dir")
        return VideoPairs(
            cfg.video_dir,
            cfg.video_annotations,
            cfg.video_frame_distance,
            cfg.sav_ann_every,
            cfg.min_pixels,
            cfg.max_image_pixels,
        )
    raise ValueError(f"data.source must be one of {SOURCES}; got {cfg.source!r}")


def build_loader(
    cfg: DataConfig,
    preprocess: Preprocess,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    source=None,
) -> PairLoader:
    """The training loader over `source` (default: build_source(cfg, seed); a run passes its
    training side of data.heldout.split_run_data)."""
    dataset = PairDataset(source if source is not None else build_source(cfg, seed), preprocess, strict=cfg.strict)
    loader_class = PairLoader
    if cfg.source == "hf" and cfg.hf_streaming:  # positions in stream order (hf.py shuffles the stream itself)
        from .hf import StreamingPairLoader as loader_class
    return loader_class(
        dataset,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=cfg.num_workers,
        shuffle=cfg.shuffle,
    )


__all__ = [
    "DataConfig",
    "build_source",
    "build_loader",
    "PairDataset",
    "PairLoader",
    "Preprocess",
    "collate_pairs",
    "SyntheticPairs",
    "ManifestPairs",
    "CocoPairs",
    "RawPair",
    "BadSample",
    "REASONS",
    "NoValidSamplesError",
]
