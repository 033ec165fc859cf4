"""Pins the suite did not hold (issue 27): each test fails if the behaviour it names is switched
off — the teacher's stop at the end text, the image normalisation constants, the non-finite
check of a later shard, the restore of every random generator on resume."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint_hardening import (  # noqa: F401 (fixtures)
    FAST,
    edit_tensors,
    released,  # noqa: F401 (fixture)
    set_value,
    shard_holding,
    sharded,
)

from pg_train.config import load_config
from pg_train.data.loader import Preprocess
from pg_train.model import CheckpointError, build_model, from_pretrained

try:  # the objectives package (issue 26) or the module it grew from
    from pg_train.objectives.pseudo_gumbel import PseudoGumbelConfig, generate_pseudo_tokens_with_ema
except ImportError:
    from pg_train.objectives.settings import PseudoGumbelConfig
    from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


# ---- the teacher stops at its end text ------------------------------------------------------------
class ScriptedHead(torch.nn.Module):
    """An lm_head whose k-th call (the k-th decoding step) puts all the mass on script[k]."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size, dtype=hidden.dtype, device=hidden.device)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 100.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("static_cache", [False, True])
def test_teacher_caption_stops_at_the_end_text_and_drops_it(static_cache):
    """The released model ends an answer with the end *text* (BPE-glued to the word before it),
    not with a special id: the teacher must cut the caption there, whatever follows."""
    model = build_model("tiny", seed=0).eval()
    prompts = model.prompts
    caption, after = "red circle", " and a long tail of words"
    script = prompts.encode(caption + prompts.end_text + after)
    assert model.eos_token_id not in script
    model.language_model.lm_head = ScriptedHead(script, model.preset.language.vocab_size)
    cfg = PseudoGumbelConfig(max_caption_len=len(script), static_cache=static_cache)
    size = model.preset.vision.image_size
    cells = torch.zeros(1, model.grid_size, model.grid_size, dtype=torch.bool)
    cells[0, :2, :2] = True
    ids, lengths = generate_pseudo_tokens_with_ema(model, torch.zeros(1, 3, size, size), cells, cfg)
    assert prompts.tokenizer.decode(ids[0, : lengths[0]]) == caption
    assert lengths[0] == len(prompts.encode(caption)) < len(script)


# ---- image normalisation: InternVL's / SAM2's constants, from independent sources -------------------
def test_image_normalisation_is_the_released_models_imagenet_constants():
    """InternVL2.5's preprocessing (and SAM2's) normalise with ImageNet mean/std; the reference
    values come from transformers' and sam2's own constants, not from pg_train."""
    from sam2.utils.transforms import SAM2Transforms
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    sam2 = SAM2Transforms(resolution=64, mask_threshold=0.0)
    assert list(sam2.mean) == list(IMAGENET_DEFAULT_MEAN) and list(sam2.std) == list(IMAGENET_DEFAULT_STD)
    colour = (200, 100, 50)
    image = Image.new("RGB", (64, 48), colour)
    expected = torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    ).view(3, 1, 1)
    p = Preprocess(mllm_size=56, sam_size=32)
    from pg_train.data.images import image_tensor

    for tensor in (p.views(image)[0], image_tensor(image, 32)):
        torch.testing.assert_close(tensor, expected.expand_as(tensor), rtol=0, atol=1e-5)


# ---- every shard of a sharded checkpoint is checked for NaN/Inf --------------------------------------
@pytest.mark.parametrize("which", ["first", "last"])
def test_nonfinite_value_in_any_shard_is_refused_naming_it(sharded, which):  # noqa: F811
    import json

    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    shard = files[0] if which == "first" else files[-1]
    name = next(n for n, f in sorted(weight_map.items()) if f == shard)
    assert shard_holding(sharded, name).name == shard
    edit_tensors(sharded / shard, lambda state: state[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', chr(92) + '.')}: \d+ NaN"):
        from_pretrained(sharded)


# ---- every random generator is restored on resume --------------------------------------------------------
def test_resume_restores_python_numpy_and_torch_random_state(tmp_path, monkeypatch):
    """The state each generator has at the first step after resuming is the one saved with the
    checkpoint; set_up, and the step between Accelerate's restore and pg_train's, are made to draw
    from all three, so a generator left alone differs."""
    import pg_train.train as train_module
    from pg_train.checkpointing import load_rng_state, rng_state
    from pg_train.train import train

    args = [*FAST, f"output_dir={tmp_path}", "save_every=2", "eval_every=0"]
    assert train(load_config([], [*args, "max_steps=2"])).exit_code == 0
    saved = load_rng_state(tmp_path / "checkpoints" / "step-00000002", 0)

    real_set_up, real_window, seen = train_module.set_up, train_module.optimizer_window, []

    def set_up(cfg):
        run = real_set_up(cfg)
        random.random(), np.random.rand(), torch.rand(1)  # what building a bigger model might draw
        return run

    def window(*a, **kw):
        if not seen:
            seen.append(rng_state())
        return real_window(*a, **kw)

    real_trainer_state = train_module.load_trainer_state

    def load_trainer_state(*a, **kw):  # after Accelerate restored its copy: only pg_train's own file is left
        random.random(), np.random.rand(), torch.rand(1)
        return real_trainer_state(*a, **kw)

    monkeypatch.setattr(train_module, "set_up", set_up)
    monkeypatch.setattr(train_module, "load_trainer_state", load_trainer_state)
    monkeypatch.setattr(train_module, "optimizer_window", window)
    assert train(load_config([], [*args, "max_steps=3", "resume=auto"])).exit_code == 0
    now = seen[0]
    assert now["python"] == saved["python"], "Python's random state not restored"
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(now["numpy"], saved["numpy"])), (
        "NumPy's random state not restored"
    )
    assert torch.equal(now["torch"], saved["torch"]), "torch's random state not restored"
