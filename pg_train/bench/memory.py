"""Peak-memory measurement that works on CPU (RSS sampled by a thread) and CUDA (allocator)."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class PeakMemory:
    """Context manager: `.peak_bytes` = highest memory above the level at entry.

    CUDA: the caching allocator's max_memory_allocated (exact). CPU: process RSS sampled every
    millisecond — allocations that live for less than that can be missed, which is fine for
    the tensors benchmarked here (they take far longer than 1 ms to fill).
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._process.memory_info().rss)
            self.peak_bytes = self._max - self._start
        return False


class SavedTensorBytes:
    """Bytes autograd keeps for backward inside the context (exact, any device). Storages of
    `exclude` (inputs and parameters that exist anyway) are not counted."""

    def __init__(self, exclude: tuple[torch.Tensor, ...] = ()):
        self.bytes = 0
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        if key and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
