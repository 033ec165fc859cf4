"""Training pairs (image1, mask1, image2, mask2, caption) from synthetic scenes, a JSONL
manifest or COCO/RefCOCO annotations, preprocessed for the MLLM and SAM2."""
from __future__ import annotations

from dataclasses import dataclass, field

from .coco import CocoPairs
from .loader import NoValidSamplesError, PairDataset, PairLoader, Preprocess, collate_pairs
from .manifest import ManifestPairs
from .synthetic import COLOURS, TEXTURES, SyntheticPairs
from .types import REASONS, BadSample, RawPair


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest | coco
    num_samples: int = 256  # synthetic: scenes per epoch
    image_size: int = 448  # synthetic: canvas size
    sizes: list[str] = field(default_factory=lambda: ["tiny", "small", "medium", "large"])  # synthetic object sizes
    min_objects: int = 2  # synthetic: objects per scene
    max_objects: int = 5
    colours: list[str] | None = None  # synthetic: colour names to draw from (default: all 12)
    textures: list[str] | None = None  # synthetic: plain | striped | dotted | checkered (default: all)
    distinct_colours: bool = False  # synthetic: no two objects of a scene share a colour
    manifest: str | None = None
    coco_instances: str | None = None
    coco_images: str | None = None
    coco_refs: str | None = None
    pairing: str = "augment"  # coco and synthetic: same (image 2 is image 1) | augment (an augmented view)
    min_pixels: int = 16
    strict: bool = False
    num_workers: int = 0
    shuffle: bool = True


def build_source(cfg: DataConfig, seed: int = 0):
    if cfg.source == "synthetic":
        return SyntheticPairs(cfg.num_samples, seed=seed, image_size=cfg.image_size, min_pixels=cfg.min_pixels,
                              min_objects=cfg.min_objects, max_objects=cfg.max_objects, sizes=tuple(cfg.sizes),
                              colours=tuple(cfg.colours or COLOURS), textures=tuple(cfg.textures or TEXTURES),
                              distinct_colours=cfg.distinct_colours, pairing=cfg.pairing)
    if cfg.source == "manifest":
        if not cfg.manifest:
            raise ValueError("data.source=manifest needs data.manifest=<path to .jsonl>")
        return ManifestPairs(cfg.manifest, min_pixels=cfg.min_pixels)
    if cfg.source == "coco":
        if not (cfg.coco_instances and cfg.coco_images):
            raise ValueError("data.source=coco needs data.coco_instances and data.coco_images")
        return CocoPairs(cfg.coco_instances, cfg.coco_images, cfg.coco_refs, cfg.pairing, seed, cfg.min_pixels)
    raise ValueError(f"data.source must be synthetic, manifest or coco; got {cfg.source!r}")


def build_loader(cfg: DataConfig, preprocess: Preprocess, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> PairLoader:
    dataset = PairDataset(build_source(cfg, seed), preprocess, strict=cfg.strict)
    return PairLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=cfg.num_workers, shuffle=cfg.shuffle)


__all__ = [
    "DataConfig", "build_source", "build_loader", "PairDataset", "PairLoader", "Preprocess", "collate_pairs",
    "SyntheticPairs", "ManifestPairs", "CocoPairs", "RawPair", "BadSample", "REASONS", "NoValidSamplesError",
]
