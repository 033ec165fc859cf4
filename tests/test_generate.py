"""Caption decoding with a static KV cache (buffers allocated once, fixed-shape steps: what CUDA
graph capture needs) gives exactly the tokens of the dynamic-cache decoding."""

import pytest
import torch
from conftest import make_batch, with_lora_weights

from pg_train.ema import EMATeacher
from pg_train.model import build_model
from pg_train.model.generate import generate_from_embeds
from pg_train.model.regions import region_cells
from pg_train.pseudo_gumbel import PseudoGumbelConfig, generate_pseudo_tokens_with_ema, region_prompts


@pytest.fixture(scope="module")
def model():
    return with_lora_weights(build_model("tiny", seed=0)).eval()


def prompt_embeds(model, batch_size=3, seed=0):
    pixel_values, _, masks = make_batch(model, batch_size, seed)
    cells, _ = region_cells(masks, model.grid_size)
    assert len(set(cells.flatten(1).sum(1).tolist())) > 1, "left padding needs different K"
    ids, attention = region_prompts(model, cells, None)
    return model.embed_with_images(ids, model.extract_feature(pixel_values), cells), attention, pixel_values, cells


@pytest.mark.parametrize("sampled", [False, True])
def test_static_cache_decoding_equals_dynamic_token_for_token(model, sampled):
    embeds, attention, _, _ = prompt_embeds(model)
    out = {}
    for static in (False, True):
        out[static] = generate_from_embeds(
            model.language_model,
            embeds,
            attention,
            max_new_tokens=12,
            min_new_tokens=2,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
            stop=model.prompts.stop,
            do_sample=sampled,
            temperature=1.5,
            generator=torch.Generator().manual_seed(3),
            static_cache=static,
        )
    assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])


def test_static_cache_decoding_stops_where_the_dynamic_one_does(model):
    """Only eos and one word allowed: rows stop at different steps; the static path pads the same."""
    embeds, attention, _, _ = prompt_embeds(model, seed=1)
    vocab = model.preset.language.vocab_size
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[[model.eos_token_id, *model.tokenizer.encode("red blue", add_special_tokens=False)]] = True
    out = [
        generate_from_embeds(
            model.language_model,
            embeds,
            attention,
            max_new_tokens=10,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
            suppress_token_ids=(~keep).nonzero().flatten(),
            stop=model.prompts.stop,
            static_cache=static,
        )
        for static in (False, True)
    ]
    assert torch.equal(out[0][0], out[1][0]) and out[0][1].tolist() == out[1][1].tolist()


@pytest.mark.parametrize("placement", ["same", "cpu", "full:cpu"])
def test_static_cache_teacher_captions_for_every_ema_placement(placement):
    student = with_lora_weights(build_model("tiny", seed=0))
    ema = EMATeacher(student, decay=0.5, placement=placement)
    with torch.no_grad():  # the student moves away from the shadow: a teacher that is the student would differ
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    _, _, _, cells = prompt_embeds(student)
    pixel_values, _, _ = make_batch(student, 3, 0)
    captions = {}
    for static in (False, True):
        cfg = PseudoGumbelConfig(max_caption_len=10, static_cache=static)
        captions[static] = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
    assert torch.equal(captions[False][0], captions[True][0]) and torch.equal(captions[False][1], captions[True][1])
    plain = generate_pseudo_tokens_with_ema(
        student, pixel_values, cells, PseudoGumbelConfig(max_caption_len=10, static_cache=True)
    )
    assert not torch.equal(plain[0], captions[True][0]), "the test needs the teacher to differ from the student"
