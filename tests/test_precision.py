"""The teacher computes in the student's dtype in every launch mode (pg_train.precision).

Accelerate's bf16 mixed precision autocasts the prepared model's `forward` only; the teacher
calls other methods. These tests run a real Accelerator with bf16 mixed precision on the CPU (it
autocasts there too) and record the dtype of every language-model matmul output per stage.
"""

import contextlib
import threading
from collections import defaultdict

import pytest
import torch
from conftest import with_lora_weights
from test_pseudo_gumbel import make_step_batch

from pg_train.ema import EMATeacher
from pg_train.model import build_model
from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import caption_batch
from pg_train.precision import autocast_dtype, compute_autocast, follow_accelerator


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test with another mixed precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def bf16_student(accelerator):
    model = with_lora_weights(build_model("tiny", seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model


class MatmulDtypes:
    """dtypes of the language model's Linear outputs, per observed stage (or per thread label)."""

    def __init__(self, module):
        self.seen = defaultdict(set)
        self.stage = None
        self.hooks = [
            m.register_forward_hook(self._record)
            for m in module.language_model.modules()
            if isinstance(m, torch.nn.Linear)
        ]

    def _record(self, _module, _inputs, output):
        if self.stage is not None:
            self.seen[self.stage].add(output.dtype)

    @contextlib.contextmanager
    def __call__(self, stage):
        self.stage = stage
        try:
            yield
        finally:
            self.stage = None

    def remove(self):
        for h in self.hooks:
            h.remove()


def test_every_stage_computes_in_the_students_dtype_under_bf16_mixed_precision(fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    assert autocast_dtype(accelerator) == torch.bfloat16
    student = bf16_student(accelerator)
    module = student.module if hasattr(student, "module") else student
    assert next(module.parameters()).dtype == torch.float32  # fp32 weights, autocast forward
    batch = make_step_batch(module)
    cfg = PseudoGumbelConfig(max_caption_len=6, min_caption_len=6, topk=16)

    # Without the recorded dtype the teacher decodes in fp32 while the passes run in bf16 (the bug).
    ema = EMATeacher(student, decay=0.9)
    observer = MatmulDtypes(module)
    pseudo_gumbel_step(student, ema, batch, cfg, observer=observer)
    assert observer.seen["teacher"] == {torch.float32}
    assert observer.seen["pass1"] == observer.seen["pass2"] == {torch.bfloat16}

    follow_accelerator(student, accelerator)
    observer.seen.clear()
    out = pseudo_gumbel_step(student, ema, batch, cfg, observer=observer)
    observer.remove()
    assert {s: observer.seen[s] for s in ("teacher", "pass1", "pass2")} == {
        "teacher": {torch.bfloat16},
        "pass1": {torch.bfloat16},
        "pass2": {torch.bfloat16},
    }
    assert torch.isfinite(out.loss)


def test_full_copy_teacher_in_the_overlap_thread_computes_in_the_students_dtype(fresh_accelerate_state):
    """placement full:<device> copies the model after follow_accelerator (the copy carries the
    dtype); autocast is per thread, so the overlapped teacher's thread must enter it itself."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    student = bf16_student(accelerator)
    follow_accelerator(student, accelerator)
    ema = EMATeacher(student, decay=0.9, placement="full:cpu")
    teacher = ema.synced_copy()
    batch = make_step_batch(teacher)
    observer = MatmulDtypes(teacher)
    cfg = PseudoGumbelConfig(max_caption_len=4, min_caption_len=4, topk=16)

    def caption():
        with observer("thread"):
            caption_batch(teacher, batch, cfg)

    thread = threading.Thread(target=caption)
    thread.start()
    thread.join()
    observer.remove()
    assert observer.seen["thread"] == {torch.bfloat16}


def test_no_mixed_precision_records_nothing_and_weights_compute_as_stored(fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert autocast_dtype(accelerator) is None
    student = bf16_student(accelerator)
    follow_accelerator(student, accelerator)
    assert isinstance(compute_autocast(student), contextlib.nullcontext)
