"""The last-layer-trimmed decoder must be the same function of the kept rows as the full
Qwen2 forward: values, gradients and the KV cache it leaves for decoding."""

import pytest
import torch
from transformers import DynamicCache

from pg_train.model import build_offline
from pg_train.model.arch.decoder import decoder_hidden_states


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_offline("tiny", device="cpu", dtype=torch.float32, seed=0)


def _inputs(model, pad: bool):
    torch.manual_seed(1)
    B, L = 3, 12
    embeds = torch.randn(B, L, model.preset.language.hidden_size)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        mask[0, :3] = 0  # left padding
        mask[1, 7:9] = 0  # padded caption slots in the middle
    return embeds, mask, model.position_ids(mask)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("keep", [slice(5, 9), slice(-1, None), slice(0, None)])
def test_kept_rows_equal_the_full_forward(model, pad, keep):
    decoder = model.language_model.model
    embeds, mask, positions = _inputs(model, pad)
    full = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    kept = decoder_hidden_states(decoder, embeds, mask, positions, keep)
    assert kept.shape == full[:, keep].shape
    torch.testing.assert_close(kept, full[:, keep], rtol=1e-5, atol=1e-5)


def test_gradients_of_the_trainable_weights_equal_the_full_forward(model):
    decoder = model.language_model.model
    embeds, mask, positions = _inputs(model, pad=True)
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    assert trainable  # LoRA

    def grads(hidden):
        return torch.autograd.grad(hidden.square().sum(), trainable)

    full = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    for a, b in zip(grads(full[:, 6:10]), grads(decoder_hidden_states(decoder, embeds, mask, positions, slice(6, 10)))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_cache_it_fills_decodes_like_the_full_forwards_cache(model):
    decoder = model.language_model.model
    embeds, mask, positions = _inputs(model, pad=True)
    full_cache, trimmed_cache = DynamicCache(), DynamicCache()
    prompt = slice(0, -1)
    decoder(
        inputs_embeds=embeds[:, prompt],
        attention_mask=mask[:, prompt],
        position_ids=positions[:, prompt],
        cache=full_cache,
        use_cache=True,
    )
    decoder_hidden_states(
        decoder, embeds[:, prompt], mask[:, prompt], positions[:, prompt], slice(-1, None), cache=trimmed_cache
    )
    step = dict(inputs_embeds=embeds[:, -1:], attention_mask=mask, position_ids=positions[:, -1:])
    expected = decoder(**step, cache=full_cache, use_cache=True).last_hidden_state
    got = decoder_hidden_states(
        decoder, step["inputs_embeds"], mask, step["position_ids"], slice(-1, None), cache=trimmed_cache
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert trimmed_cache.get_seq_length() == full_cache.get_seq_length() == embeds.shape[1]


def test_rejects_a_selection_that_is_not_a_run_of_rows(model):
    embeds, mask, positions = _inputs(model, pad=False)
    with pytest.raises(ValueError, match="consecutive rows"):
        decoder_hidden_states(model.language_model.model, embeds, mask, positions, slice(0, None, 2))
    with pytest.raises(ValueError, match="consecutive rows"):
        decoder_hidden_states(model.language_model.model, embeds, mask, positions, slice(20, 30))


def test_trim_is_a_per_call_argument_and_a_per_model_setting(model, monkeypatch):
    """trim=False runs the plain forward (every layer on every row) with the same values; the
    model's trim_last_layer is passed to every decoder call it makes, and is this model's alone."""
    import pg_train.model.arch.sa2va as sa2va

    decoder = model.language_model.model
    embeds, mask, positions = _inputs(model, pad=True)
    trimmed = decoder_hidden_states(decoder, embeds, mask, positions, slice(5, 9))
    untrimmed = decoder_hidden_states(decoder, embeds, mask, positions, slice(5, 9), trim=False)
    torch.testing.assert_close(untrimmed, trimmed, rtol=1e-5, atol=1e-5)

    import pg_train.model.decoding.generate as generate
    from pg_train.memcheck.measure import build_batch
    from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
    from pg_train.objectives.settings import PseudoGumbelConfig

    seen = []  # the trim of every decoder call the step makes: teacher decoding, pass 1, pass 2
    for module in (sa2va, generate):
        real = module.decoder_hidden_states
        monkeypatch.setattr(
            module, "decoder_hidden_states", lambda *a, _real=real, **k: seen.append(k["trim"]) or _real(*a, **k)
        )
    other = build_offline("tiny", device="cpu", dtype=torch.float32, seed=0)
    other.trim_last_layer = False
    cfg = PseudoGumbelConfig(max_caption_len=3, min_caption_len=3, topk=8)
    for m in (model, other):
        seen.clear()
        pseudo_gumbel_step(m, m, build_batch(m, 2, torch.device("cpu")), cfg)
        assert seen and all(t is m.trim_last_layer for t in seen), seen
    assert model.trim_last_layer and not other.trim_last_layer
