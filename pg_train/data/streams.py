"""Two data streams (issue 26): labelled pairs (with text) and unlabelled pairs (text unused),
each its own source and its own shuffled, rank-sharded, resumable order; every micro-batch draws
`batch_size` samples from both in a scheduled ratio.

Each stream is a PairLoader of one sample per batch, so a stream's position is a sample count
and a micro-batch can take any number of samples from it. The labelled share of micro-batch m is
carried over as a remainder (`credit`), so over many micro-batches the labelled count equals the
scheduled fraction to within one sample, whatever the batch size; the split depends only on the
micro-batch index and the schedule, so every rank draws the same counts (the ranks' graphs stay
alike under DDP / ZeRO). `state_dict()` holds both positions, the counter and the credit: a
resumed run draws exactly the samples the uninterrupted one would have.

The two streams may be one PairLoader (train.stream_loaders: equal data sections): both parts
then draw from one shuffled order, so a sample is labelled or unlabelled in an epoch, never both,
and a curriculum's Pseudo-Gumbel stage continues the order its warm-up drew from, as one stream did.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator

import torch

from .loader import PairLoader

CONCAT_KEYS = ("pixel_values1", "pixel_values2", "sam_pixel_values2", "region_masks1", "masks2")


def concat_batches(batches: list[dict]) -> dict | None:
    """Single-sample loader batches (collate_pairs' output) as one batch; None when none holds a
    sample. Image 2 stays image 1's tensor when it is in every part (the ViT then runs once)."""
    good = [b for b in batches if "pixel_values1" in b]
    if not good:
        return None
    out = {key: torch.cat([b[key] for b in good]) for key in good[0] if isinstance(good[0][key], torch.Tensor)}
    if all(b["pixel_values2"] is b["pixel_values1"] for b in good):
        out["pixel_values2"] = out["pixel_values1"]
    out["captions"] = [c for b in good for c in b["captions"]]
    out["skipped"] = [s for b in batches for s in b["skipped"]]
    return out


def labelled_count(credit: float, fraction: float, batch_size: int) -> tuple[int, float]:
    """Labelled samples of the next micro-batch and the credit carried on: the scheduled share
    plus what earlier micro-batches owe, rounded down (within 1e-9, so 0.3 x 10 is 3)."""
    owed = credit + fraction * batch_size
    count = min(batch_size, max(0, math.floor(owed + 1e-9)))
    return count, owed - count


class TwoStreams:
    """Micro-batches {"labelled": batch | None, "unlabelled": batch | None} of `batch_size`
    samples in all; `fraction(step)` is the labelled share at optimizer step `step`
    (micro-batch m belongs to step m // grad_accum). `labelled` and `unlabelled` may be the same
    loader (one order both draw from)."""

    def __init__(
        self,
        labelled: PairLoader,
        unlabelled: PairLoader,
        batch_size: int,
        fraction: Callable[[int], float],
        grad_accum: int = 1,
    ):
        if labelled.batch_size != 1 or unlabelled.batch_size != 1:
            raise ValueError("each stream's PairLoader draws one sample per batch")
        self.streams = {"labelled": labelled, "unlabelled": unlabelled}
        self.batch_size = batch_size
        self.fraction = fraction
        self.grad_accum = grad_accum
        self.micro_batches = 0
        self.credit = 0.0

    @property
    def shared(self) -> bool:
        return self.streams["labelled"] is self.streams["unlabelled"]

    @property
    def skip_counts(self) -> Counter:
        loaders = {id(s): s for s in self.streams.values()}.values()
        return sum((s.skip_counts for s in loaders), Counter())

    @property
    def epoch(self) -> int:
        """The unlabelled stream's epoch (the stream self-training runs over)."""
        return self.streams["unlabelled"].epoch

    def __iter__(self) -> Iterator[dict]:
        by_loader = {id(loader): iter(loader) for loader in self.streams.values()}
        iterators = {name: by_loader[id(loader)] for name, loader in self.streams.items()}

        def draw(name: str, count: int) -> dict | None:
            parts: list[dict] = []
            while sum(len(p.get("captions", ())) for p in parts) < count:
                parts.append(next(iterators[name]))
            return concat_batches(parts)

        while True:
            step = self.micro_batches // self.grad_accum
            count, credit = labelled_count(self.credit, self.fraction(step), self.batch_size)
            batch = {"labelled": draw("labelled", count), "unlabelled": draw("unlabelled", self.batch_size - count)}
            self.micro_batches, self.credit = self.micro_batches + 1, credit
            yield batch

    def state_dict(self) -> dict:
        return {
            "streams": {name: loader.state_dict() for name, loader in self.streams.items()},
            "micro_batches": self.micro_batches,
            "credit": self.credit,
        }

    def check_state_dict(self, state: dict) -> None:
        """ValueError naming the field unless `load_state_dict(state)` loads all of it."""
        if not isinstance(state, dict) or "streams" not in state:
            raise ValueError("data: the checkpoint's data state is of one stream; this run has two (streams.enabled)")
        for name, loader in self.streams.items():
            if name not in state["streams"]:
                raise ValueError(f"data.streams: no position of the {name} stream")
            loader.check_state_dict(state["streams"][name])
        if self.shared and state["streams"]["labelled"] != state["streams"]["unlabelled"]:
            raise ValueError(
                "data.streams: this run's two streams are one order (equal data sections) but the checkpoint "
                "holds two different positions (a run whose streams differed)"
            )
        count, credit = state.get("micro_batches"), state.get("credit")
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise ValueError(f"data.micro_batches={count!r}: expected an int >= 0")
        if not (isinstance(credit, (int, float)) and not isinstance(credit, bool) and -1e-6 < credit < 1.0):
            raise ValueError(f"data.credit={credit!r}: expected a number in [0, 1)")  # (-1e-9 after rounding)

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        for name, loader in self.streams.items():
            loader.load_state_dict(state["streams"][name])
        self.micro_batches, self.credit = state["micro_batches"], state["credit"]
