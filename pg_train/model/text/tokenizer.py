"""Tokenizers: the offline tiny tokenizer, loading a checkpoint's tokenizer, and the special-token check.

The tiny tokenizer is a byte-level BPE trained on a fixed embedded corpus (chat template pieces,
Sa2VA prompts, the synthetic scene vocabulary) and shipped as `assets/tiny_tokenizer.json`, so it
needs no download and never changes under the tests. Like Qwen's, ordinary text ids come first
and the special / added tokens are appended after them in Sa2VA's order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

TINY_TOKENIZER_FILE = Path(__file__).parent / "assets" / "tiny_tokenizer.json"
TINY_BASE_VOCAB = 480

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Sa2VA's added tokens, in the released order (ids 151,665 ... 151,678 in the real tokenizer).
SA2VA_ADDED_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "[SEG]",
    "<p>",
    "</p>",
    "<vp>",
    "</vp>",
]
# Qwen's control tokens then Sa2VA's added tokens, in the released order.
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, *SA2VA_ADDED_TOKENS]
# The tokens the model logic depends on: each must be exactly one known id.
REQUIRED_SINGLE_TOKENS = ("[SEG]", "<vp>", "</vp>", "<IMG_CONTEXT>", "<img>", "</img>")

_COLOURS = "red green blue yellow orange purple pink brown black white gray grey cyan magenta".split()
_SHAPES = "circle square triangle rectangle ellipse star diamond hexagon cross ring blob object shape region".split()
_WORDS = (
    "the a an small large big tiny medium huge little at in on of near and with to is it this that "
    "top bottom left right center middle corner edge upper lower side above below next behind front "
    "striped dotted checkered plain textured solid outlined filled bright dark light pale "
    "sure please segment describe region briefly there are part regions picture image "
    "image1 image2 region1 question answer caption one two three four five"
).split()


def _training_corpus() -> list[str]:
    corpus = [
        "<|user|>\n",
        "<|end|>\n",
        "<|assistant|>\n",
        "<|end|>",
        "There are 1 part regions in the picture: region1",
        "Please segment: ",
        "Please segment {expression} in this image.",
        "Please give me a short description of region1.",
        " Region: ",
        ". Describe this region briefly.",
        "It is ",
        "Sure, ",
        ".",
        "\n",
    ]
    for colour in _COLOURS:
        for shape in _SHAPES:
            corpus.append(f"the small {colour} {shape} at the top left. A large {colour} {shape} near the center.")
    corpus.append(" ".join(_WORDS))
    corpus.append("0 1 2 3 4 5 6 7 8 9 , ; : ! ? ' \" ( ) - _ / [ ] { } < > | = + * & % $ # @")
    return corpus * 4


def train_tiny_tokenizer():
    """Train the tiny byte-level BPE (deterministic; used to (re)generate the shipped file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _wrap(tokenizer_object) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    )


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    if not TINY_TOKENIZER_FILE.exists():
        raise FileNotFoundError(
            f"{TINY_TOKENIZER_FILE} is missing; regenerate it with `python -m pg_train.model.text.tokenizer`"
        )
    return _wrap(Tokenizer.from_file(str(TINY_TOKENIZER_FILE)))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A checkpoint's own tokenizer (tokenizer.json in the directory); never downloads."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists() and not (directory / "vocab.json").exists():
        raise FileNotFoundError(f"{directory}: no tokenizer.json or vocab.json; a Sa2VA checkpoint ships its tokenizer")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def special_id_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bool [vocab_size]: True for every id that is not ordinary text — special and added tokens
    (image, region, [SEG], chat control, padding) and lm_head rows beyond the tokenizer."""

    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[len(tokenizer) :] = True
    added = list(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    ids = [i for i in added + list(tokenizer.all_special_ids) if i is not None and 0 <= i < vocab_size]
    mask[ids] = True
    return mask


class SpecialTokenError(ValueError):
    pass


def special_token_ids(tokenizer, expected: dict[str, int] | None = None) -> dict[str, int]:
    """Map each required special token to its id, or raise naming every problem.

    A token that does not encode to exactly one id (e.g. `[SEG]` split into `[`, `SE`, `G`, `]`)
    would silently remove the mask supervision — the failure that trained a public
    implementation for days at loss 0. So this runs at model build time, always.
    """
    ids: dict[str, int] = {}
    problems = []
    names = list(REQUIRED_SINGLE_TOKENS) + [EOS_TOKEN]
    for name in names:
        encoded = tokenizer.encode(name, add_special_tokens=False)
        if len(encoded) != 1:
            problems.append(f"{name!r} encodes to {len(encoded)} ids {encoded} (expected exactly one)")
            continue
        ids[name] = encoded[0]
        if expected and name in expected and expected[name] != encoded[0]:
            problems.append(f"{name!r} encodes to id {encoded[0]}, the model expects {expected[name]}")
    if problems:
        raise SpecialTokenError("tokenizer special tokens are wrong:\n  " + "\n  ".join(problems))
    return ids


if __name__ == "__main__":
    TINY_TOKENIZER_FILE.parent.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer().save(str(TINY_TOKENIZER_FILE))
    print(f"wrote {TINY_TOKENIZER_FILE}")
