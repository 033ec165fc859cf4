"""From a source of RawPairs to batches: preprocessing, skipping bad samples, rank shards, resume.

A source is anything with `__len__` and `load(index) -> RawPair` that raises `BadSample` for a
sample it cannot produce (synthetic.py, manifest.py, coco.py).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..model.text.regions import region_grids
from .images import image_tensor, mask_tensor
from .tiling import Tiling
from .types import BadSample, unforeseen_errors_as_bad_sample

# pixel_valuesN holds every sample's views back to back ([sum of num_viewsN, 3, S, S]; one view
# per sample unless the model tiles its images).
TENSOR_KEYS = (
    "pixel_values1",
    "num_views1",
    "region_masks1",
    "region_nearest1",
    "region_coverage1",
    "pixel_values2",
    "num_views2",
    "sam_pixel_values2",
    "masks2",
)


@dataclass(frozen=True)
class Preprocess:
    mllm_size: int = 448  # InternViT input
    sam_size: int = 1024  # SAM2 input (direct resize)
    tiling: Tiling | None = None  # InternVL dynamic tiling for the MLLM views; None: one view
    region_grid: int = 16  # the image-token grid of one view (G x G: 16 for 448-px views), where regions lie
    sam_normalise: str = "float32"  # the SAM2 input's normalisation arithmetic (images.image_tensor)

    def views(self, image) -> torch.Tensor:
        """[num_views, 3, mllm_size, mllm_size]: the image's tiles (then thumbnail), or one view."""
        if self.tiling is None or not self.tiling.dynamic:
            return image_tensor(image, self.mllm_size)[None]
        return torch.stack([image_tensor(view, self.mllm_size) for view in self.tiling.views(image)])


def preprocess_for(preset) -> Preprocess:
    """The preprocessing a model preset implies (sizes, and the tiling of its config.json)."""
    vision = preset.vision
    tiling = Tiling(
        vision.image_size,
        vision.dynamic_image_size,
        vision.min_dynamic_patch,
        vision.max_dynamic_patch,
        vision.use_thumbnail,
    )
    return Preprocess(
        vision.image_size, preset.sam2.image_size, tiling, vision.grid_size, sam_normalise=preset.sam2.normalise_dtype
    )


def region_tensors(mask: np.ndarray, preprocess: Preprocess) -> dict:
    """A region (bool [H, W] at the image's resolution) as a batch carries it: its cell maps on
    the G x G grid computed from this full-resolution mask, as the released model does
    (`region_nearest1`, `region_coverage1`: model.text.regions), and the mask at one view's size
    (`region_masks1`; the whole image's mask: the region indexes the last view, the thumbnail or
    the only view, which shows the whole image) for display."""
    nearest, coverage = region_grids(torch.from_numpy(np.asarray(mask, np.float32))[None], preprocess.region_grid)
    return {
        "region_masks1": mask_tensor(mask, preprocess.mllm_size),
        "region_nearest1": nearest[0],
        "region_coverage1": coverage[0],
    }


class PairDataset(Dataset):
    """Preprocessed pairs. A bad sample is replaced by the next good one of the source (up to
    `max_refill` tries) and its reason travels with the item, so batches stay full, counts stay
    exact across workers, and a single bad file never stops a run. `strict` raises instead."""

    def __init__(self, source, preprocess: Preprocess, strict: bool = False, max_refill: int = 16):
        self.source = source
        self.preprocess = preprocess
        self.strict = strict
        self.max_refill = max_refill

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        """The item, or in strict mode the bad sample's (reason, where, detail) for the loader to
        raise in the main process: raised in a DataLoader worker, torch would rebuild it from its
        message alone and fail, leaving a bare RuntimeError with the file and line buried in text."""
        try:
            return self._item(index)
        except BadSample as err:
            if not self.strict:
                raise
            return {"index": index, "skipped": [], "bad_sample": (err.reason, err.where, err.detail)}

    def _item(self, index: int) -> dict:
        skipped = []
        for attempt in range(self.max_refill + 1):
            candidate = (index + attempt) % len(self.source)
            try:
                # a source's unforeseen exception is still one sample's problem (counted as load_error)
                with unforeseen_errors_as_bad_sample(f"{type(self.source).__name__} sample {candidate}"):
                    raw = self.source.load(candidate)
            except BadSample as err:
                if self.strict:
                    raise
                skipped.append((err.reason, str(err)))
                continue
            p = self.preprocess
            pixel_values1 = p.views(raw.image1)
            # the same tensor when image 2 is image 1: the frozen ViT then runs once for both
            pixel_values2 = pixel_values1 if raw.image2 is raw.image1 else p.views(raw.image2)
            return {
                "pixel_values1": pixel_values1,
                "num_views1": torch.tensor(len(pixel_values1)),
                **region_tensors(raw.mask1, p),
                "pixel_values2": pixel_values2,
                "num_views2": torch.tensor(len(pixel_values2)),
                "sam_pixel_values2": image_tensor(raw.image2, p.sam_size, p.sam_normalise),
                "masks2": mask_tensor(raw.mask2, p.sam_size),
                "caption": raw.caption,
                "index": index,
                "skipped": skipped,
            }
        return {"index": index, "skipped": skipped}


def collate_pairs(items: list[dict]) -> dict:
    good = [item for item in items if "pixel_values1" in item]
    views = ("pixel_values1", "pixel_values2")
    batch: dict = (
        {key: (torch.cat if key in views else torch.stack)([item[key] for item in good]) for key in TENSOR_KEYS}
        if good
        else {}
    )
    if good and all(item["pixel_values2"] is item["pixel_values1"] for item in good):
        batch["pixel_values2"] = batch["pixel_values1"]  # kept one tensor (see PairDataset)
    batch["captions"] = [item["caption"] for item in good]
    batch["indices"] = torch.tensor([item["index"] for item in good], dtype=torch.long)
    batch["skipped"] = [s for item in items for s in item["skipped"]]
    batch["bad_samples"] = [item["bad_sample"] for item in items if "bad_sample" in item]  # strict mode
    return batch


PIXEL_KEYS = ("pixel_values1", "pixel_values2", "sam_pixel_values2")


def batch_to_device(batch: dict, device, pixel_dtype: torch.dtype | None = None) -> dict:
    """The batch's tensors (TENSOR_KEYS, and `sample_seeds` when present) on `device`, the pixel
    tensors cast to `pixel_dtype` (the model's dtype) if given; the one schema training,
    evaluation and memcheck move batches by."""
    keys = [k for k in (*TENSOR_KEYS, "sample_seeds") if k in batch]
    out = to_device(batch, [k for k in keys if k not in PIXEL_KEYS], device)
    out.update(to_device(batch, [k for k in keys if k in PIXEL_KEYS], device, pixel_dtype))
    return out


def to_device(batch: dict, keys, device, float_dtype: torch.dtype | None = None) -> dict:
    """The tensors under `keys` on `device` (floating ones cast to `float_dtype` if given); a
    tensor held under two keys stays one tensor, so the model's identity-keyed ViT reuse still
    sees image 2 as image 1 after the move."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for key in keys:
        tensor = batch[key]
        if id(tensor) not in moved:
            dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else None
            moved[id(tensor)] = tensor.to(device, dtype) if dtype is not None else tensor.to(device)
        out[key] = moved[id(tensor)]
    return out


class NoValidSamplesError(RuntimeError):
    pass


class PairLoader:
    """Endless, resumable iteration over this rank's shard, epoch after epoch.

    Order: a permutation of the source drawn from (seed, epoch); rank r takes positions
    r, r+W, r+2W, ... of its first W*floor(N/W) entries, so shards are disjoint, equally long
    (every rank runs the same number of steps), and the N mod W left over differ per epoch.
    `state_dict()` records (epoch, batches consumed): a resumed loader yields exactly the
    batches that would have come next.
    """

    def __init__(
        self,
        dataset: PairDataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} samples cannot be shared by {world_size} ranks")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.epoch = 0
        self.batches_done = 0
        self.skip_counts: Counter = Counter()
        self.named_reasons: set[str] = set()  # reasons whose first sample name_first_skips printed
        self.epoch_skip_counts: Counter = Counter()
        self.epoch_valid = 0
        self.epoch_summaries: list[dict] = []

    def shard(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        usable = (n // self.world_size) * self.world_size
        return order[:usable][self.rank :: self.world_size].tolist()

    def batches_per_epoch(self) -> int:
        per_rank = len(self.dataset) // self.world_size
        return -(-per_rank // self.batch_size)

    def sample_seeds(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """A seed per (data seed, epoch, sample) for the objective's per-sample noise."""
        return torch.tensor(
            [
                int(np.random.SeedSequence([self.seed, epoch, int(i)]).generate_state(1, np.uint64)[0] % 2**62)
                for i in indices.tolist()
            ],
            dtype=torch.long,
        )

    def iterator_generator(self, epoch: int) -> torch.Generator:
        """The DataLoader's own generator, a function of (seed, rank, epoch). Each DataLoader
        iterator draws its workers' base seed; without a generator that draw comes from the
        global torch RNG, so a resumed run (one iterator more, mid-epoch) would leave LoRA
        dropout and teacher sampling on another random stream than the uninterrupted run."""
        state = np.random.SeedSequence([self.seed, self.rank, epoch, 0xD47A]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state % 2**63))

    def __iter__(self):
        while True:
            order = self.shard(self.epoch)[self.batches_done * self.batch_size :]
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=order,
                collate_fn=collate_pairs,
                num_workers=self.num_workers,
                persistent_workers=False,
                generator=self.iterator_generator(self.epoch),
            )
            for batch in loader:
                if batch["bad_samples"]:  # strict mode: raised here, whole, whichever process read it
                    raise BadSample(*batch["bad_samples"][0])
                self.batches_done += 1
                reasons = Counter(reason for reason, _ in batch["skipped"])
                self.name_first_skips(batch["skipped"])
                self.skip_counts.update(reasons)
                self.epoch_skip_counts.update(reasons)
                self.epoch_valid += len(batch["indices"])
                if not len(batch["indices"]):  # every sample and its refills bad: the next batch
                    continue
                batch["sample_seeds"] = self.sample_seeds(batch["indices"], self.epoch)
                batch["epoch"] = self.epoch
                yield batch
            self._end_epoch()

    def name_first_skips(self, skipped: list[tuple[str, str]]) -> None:
        """The first skipped sample of each reason, named on stderr (file and line or row, what
        is wrong) without data.strict: counts alone (metrics.jsonl) do not say what to fix."""
        for reason, message in skipped:
            if reason not in self.named_reasons:
                self.named_reasons.add(reason)
                rank = f" (rank {self.rank})" if self.world_size > 1 else ""
                print(
                    f"[pg_train] skipped a sample{rank}: {message} — bad samples are replaced by the next good "
                    f"one and counted by reason ({reason}) in metrics.jsonl; data.strict=true stops at the first",
                    file=sys.stderr,
                    flush=True,
                )

    def _end_epoch(self) -> None:
        summary = {"epoch": self.epoch, "valid": self.epoch_valid, "skipped": dict(self.epoch_skip_counts)}
        self.epoch_summaries.append(summary)
        if self.epoch_valid == 0:
            raise NoValidSamplesError(
                f"epoch {self.epoch}: no valid sample on rank {self.rank} "
                f"(skipped: {dict(self.epoch_skip_counts) or 'none'}); check the data source"
            )
        self.epoch += 1
        self.batches_done = 0
        self.epoch_valid = 0
        self.epoch_skip_counts = Counter()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "skip_counts": dict(self.skip_counts),
            "epoch_skip_counts": dict(self.epoch_skip_counts),
            "epoch_valid": self.epoch_valid,
        }

    def check_state_dict(self, state: dict) -> None:
        """ValueError naming the field unless `load_state_dict(state)` would restore a position
        this loader can reach (resume validates before anything loads)."""
        if not isinstance(state, dict):
            raise ValueError(f"data state must be a dict, got {type(state).__name__}")
        counts = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        expected = {"epoch": counts, "batches_done": counts, "seed": lambda v: v == self.seed, "epoch_valid": counts}
        expected |= {
            k: lambda v: isinstance(v, dict) and all(map(counts, v.values()))
            for k in ("skip_counts", "epoch_skip_counts")
        }
        wrong = [
            f"{k}={state.get(k, '<missing>')!r}" for k, ok in expected.items() if k not in state or not ok(state[k])
        ]
        if wrong:
            raise ValueError(f"data state: {', '.join(wrong)} (this loader: seed {self.seed}, counts are ints >= 0)")
        if state["batches_done"] > self.batches_per_epoch():
            raise ValueError(
                f"data state: batches_done={state['batches_done']} beyond an epoch of {self.batches_per_epoch()} batches "
                f"(another data set or batch size?)"
            )

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        self.skip_counts = Counter(state["skip_counts"])
        self.epoch_skip_counts = Counter(state["epoch_skip_counts"])
        self.epoch_valid = state["epoch_valid"]
