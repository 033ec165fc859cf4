"""The offline tiny tokenizer and the special-token check every model build runs."""

import json

import pytest

from pg_train.model.text.tokenizer import (
    REQUIRED_SINGLE_TOKENS,
    SPECIAL_TOKENS,
    TINY_BASE_VOCAB,
    TINY_TOKENIZER_FILE,
    SpecialTokenError,
    load_tiny_tokenizer,
    special_token_ids,
    train_tiny_tokenizer,
)


def test_shipped_tiny_tokenizer_is_reproducible():
    shipped = json.loads(TINY_TOKENIZER_FILE.read_text())
    regenerated = json.loads(train_tiny_tokenizer().to_str())
    assert shipped == regenerated


def test_special_tokens_follow_ordinary_text_ids_in_released_order():
    tok = load_tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(TINY_BASE_VOCAB, TINY_BASE_VOCAB + len(SPECIAL_TOKENS)))
    assert len(tok) == TINY_BASE_VOCAB + len(SPECIAL_TOKENS)


def test_required_tokens_are_single_ids_and_template_text_is_plain():
    tok = load_tiny_tokenizer()
    ids = special_token_ids(tok)
    assert set(REQUIRED_SINGLE_TOKENS) <= set(ids)
    # The phi3 tags are ordinary text for Qwen-style tokenizers, never special ids.
    for text in ("<|user|>", "<|end|>", "<|assistant|>"):
        assert all(i < TINY_BASE_VOCAB for i in tok.encode(text, add_special_tokens=False))
    text = "the small red triangle at the top left"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_expected_ids_are_enforced():
    tok = load_tiny_tokenizer()
    with pytest.raises(SpecialTokenError, match=r"'\[SEG\]' encodes to id \d+, the model expects 151674"):
        special_token_ids(tok, {"[SEG]": 151674})


class _SplittingTokenizer:
    """A tokenizer that knows no added tokens: every special string splits into pieces."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_unknown_special_tokens_are_all_reported():
    with pytest.raises(SpecialTokenError) as err:
        special_token_ids(_SplittingTokenizer())
    for name in REQUIRED_SINGLE_TOKENS:
        assert repr(name) in str(err.value)
