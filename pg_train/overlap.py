"""The teacher captions the next micro-batch while the student trains on this one.

With `ema.placement=full:<device>` the teacher is a separate copy on its own device; its
decoding (two thirds of a Sa2VA-4B step on one GPU) need not wait for the student. With
`ema.overlap=true` the training loop draws micro-batches through `OverlappedTeacher`: when it
hands out batch t it starts a background thread that captions batch t+1 with the teacher as it
is then, and the student's forward, backward and optimizer step on batch t run meanwhile. The
price is a teacher one EMA update older than without overlap (batch t+1 is captioned before
update t lands) — with a decay of 0.99-0.999 a small change; `ema.overlap=false` (the default)
turns it off.

Exact and resumable: the captions are the ones a teacher one update older gives
(tests/test_train.py -k overlap_teacher), and a checkpoint saves the data position from
before the batch in flight together with its captions, so a resumed run draws that batch again
and uses the same captions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .ema import EMATeacher
from .objectives.settings import PseudoGumbelConfig
from .objectives.teacher import caption_batch


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class OverlappedTeacher:
    """Micro-batches (dicts for the objective) carrying `teacher_captions` made one step ahead.

    `batches`: the loader's batches, made into inputs by `to_inputs`; `loader`: the resumable
    loader they come from (its position before the batch in flight is what a checkpoint saves);
    `restored`: `state_dict()["captions"]` of a checkpoint, the in-flight batch's captions.
    """

    def __init__(
        self,
        loader,
        to_inputs: Callable[[dict], dict],
        ema: EMATeacher,
        cfg: PseudoGumbelConfig,
        restored: dict | None = None,
    ):
        self.loader, self.to_inputs, self.ema, self.cfg = loader, to_inputs, ema, cfg
        self._batches = iter(loader)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg_train-teacher")
        self._restored = restored
        self._pending: tuple[dict, Future] | None = None
        self._loader_state: dict | None = None

    def _launch(self) -> None:
        self._loader_state = self.loader.state_dict()  # before the batch in flight was drawn
        inputs = self.to_inputs(next(self._batches))
        if self._restored is not None:
            device = inputs["region_masks1"].device
            ids, lengths = (
                torch.tensor(self._restored[k], dtype=torch.long, device=device) for k in ("ids", "lengths")
            )
            future, self._restored = _done((ids, lengths)), None
        else:
            # The copy is synced here, in the caller's thread; the EMA update that follows this
            # step writes the shadow only, never the copy the thread reads.
            teacher = self.ema.synced_copy()
            future = self._pool.submit(caption_batch, teacher, inputs, self.cfg)
        self._pending = (inputs, future)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._pending is None:
            self._launch()
        inputs, future = self._pending
        captions = future.result()
        self._launch()
        return {**inputs, "teacher_captions": captions}

    def state_dict(self) -> dict:
        """The data position before the batch in flight, and its captions (waited for)."""
        if self._pending is None:
            return {"data": self.loader.state_dict(), "captions": None}
        ids, lengths = self._pending[1].result()
        return {"data": self._loader_state, "captions": {"ids": ids.tolist(), "lengths": lengths.tolist()}}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
