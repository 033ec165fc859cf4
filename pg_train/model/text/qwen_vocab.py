"""The real Qwen2/2.5 tokenizer rebuilt offline from its BPE ranks, plus Sa2VA's added tokens.

No tokenizer can be downloaded where pg_train is developed, but the Qwen BPE ranks
(`qwen.tiktoken`: 151,643 lines of `base64(token bytes) rank`) ship inside the PyPI package
`dashscope` (installed without its dependencies; only the file is read). The tiny tokenizer has
no real merges, so BPE effects that matter for a released checkpoint — `<|end|>` merged with the
punctuation before it, a space glued to the next word — can only be seen with this one.

The merges are recovered exactly from the ranks: a token of rank r is what rank-ordered BPE
builds from its bytes using merges of rank < r, so its last merge is the pair that BPE reaches
before r. Ids: ranks 0 … 151,642, then Qwen's control and Qwen2.5's extra tokens (151,643 …
151,664), then Sa2VA's 14 added tokens (151,665 … 151,678), as in the released tokenizer.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .tokenizer import EOS_TOKEN, PAD_TOKEN, SA2VA_ADDED_TOKENS

# Qwen2's pre-tokenizer split (single digits, unlike tiktoken's cl100k \p{N}{1,3}).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_CONTROL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
QWEN25_EXTRA_TOKENS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
NUM_BPE_TOKENS = 151_643


def find_qwen_tiktoken() -> Path | None:
    """`dashscope/resources/qwen.tiktoken` if the package is installed (it is not imported)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    return None


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """`base64 rank` lines -> {token bytes: rank}; raises naming the line on a malformed one."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="ascii").split("\n"), start=1):
        if not line:
            continue
        try:
            token, rank = line.split(" ")
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: expected '<base64> <rank>', got {line[:60]!r}") from err
    return ranks


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run rank-ordered BPE on `token`'s bytes with merges of lower rank than the token itself;
    the two parts left are the merge that makes it."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) cannot be built from lower-rank merges")
    return parts[0], parts[1]


def build_qwen_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer with Sa2VA's added tokens (len 151,679), from `qwen.tiktoken`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = path or find_qwen_tiktoken()
    if path is None:
        raise FileNotFoundError("qwen.tiktoken not found: `pip install --no-deps dashscope` ships it")
    ranks = read_ranks(path)
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_BPE_TOKENS - 1}, got {len(ranks)} tokens")
    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = sorted(((ranks[t], _last_merge(t, ranks)) for t in ranks if len(t) > 1))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(as_text(a), as_text(b)) for _, (a, b) in merges], fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN_CONTROL_TOKENS + QWEN25_EXTRA_TOKENS + SA2VA_ADDED_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=QWEN25_EXTRA_TOKENS + SA2VA_ADDED_TOKENS + ["<|im_start|>"],
    )
