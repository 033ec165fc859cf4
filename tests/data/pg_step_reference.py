"""Writes tests/data/pg_step_reference.json: one Pseudo-Gumbel step (tiny preset, LoRA weights
set, fixed batch and seeds) as the code computed it BEFORE the self-training switches existed
(issue 26), so `test_neutral_switches_equal_the_recorded_step` compares the switched step with
numbers the new code did not compute.

    PYTHONPATH=<checkout> .venv/bin/python tests/data/pg_step_reference.py   # from tests/

Recorded from git main a5bdfcd (pg_train/pseudo_gumbel.py, before the objectives package). The
record holds the loss's exact bits and a SHA-256 of every gradient's bytes, and a canary: the
mask logits of a plain segmentation pass (code the switches do not touch), so a machine whose
kernels round differently is told apart from a changed step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import with_lora_weights  # noqa: E402
from test_pseudo_gumbel import make_step_batch  # noqa: E402

from pg_train.model import build_model  # noqa: E402

try:  # the layout before issue 26
    from pg_train.pseudo_gumbel import PseudoGumbelConfig, forward_mask_with_text_embeds, pseudo_gumbel_step
except ImportError:
    from pg_train.objectives.passes import forward_mask_with_text_embeds
    from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
    from pg_train.objectives.settings import PseudoGumbelConfig

CONFIG = {"max_caption_len": 8, "topk": 16}
# The region question the recording's prompts had (issue 30 later added the official blank line
# before "Please"): the comparison is of the step's arithmetic, so it runs with the recorded words.
RECORDED_REGION_QUESTION = ".\nPlease give me a short description of the region in the picture marked by region1."


@contextlib.contextmanager
def recorded_wording():
    from pg_train.model.text.templates import TEMPLATE_SETS

    current = TEMPLATE_SETS["sa2va"]
    TEMPLATE_SETS["sa2va"] = dataclasses.replace(current, region_question=RECORDED_REGION_QUESTION)
    try:
        yield
    finally:
        TEMPLATE_SETS["sa2va"] = current


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def canary() -> str:
    torch.manual_seed(0)
    model = with_lora_weights(build_model("tiny", seed=0))
    batch = make_step_batch(model, batch_size=2, seed=3)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        logits = forward_mask_with_text_embeds(
            model, batch["pixel_values2"], batch["sam_pixel_values2"], model.embed_tokens()(ids), torch.tensor([3, 2])
        )
    return digest(logits)


def reference_step(step=pseudo_gumbel_step, cfg=None) -> dict:
    """The recorded step: loss bits and gradient digests (a test reruns this with its own step)."""
    torch.manual_seed(0)
    with recorded_wording():  # the prompts are built with the model
        model = with_lora_weights(build_model("tiny", seed=0))
        teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(model, batch_size=2, seed=3)
    out = step(model, teacher, batch, cfg or PseudoGumbelConfig(**CONFIG))
    out.loss.backward()
    grads = {name: digest(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.item().hex(), "grads": grads, "caption_ids": out.caption_ids.tolist()}


if __name__ == "__main__":
    record = {"canary": canary(), "config": CONFIG, **reference_step(), "torch": torch.__version__}
    (HERE / "pg_step_reference.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(record['grads'])} gradients, loss {float.fromhex(record['loss'])}")
