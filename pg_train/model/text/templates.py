"""Prompt templates as configuration: a chat template (how a turn starts and ends, from the
checkpoint's config.json) times a wording set (what the user asks), tokenised once.

Two rules make the ids what the released model saw:
- Special tokens are spliced as ids, never produced by tokenising a string that contains
  `<IMG_CONTEXT>` or `[SEG]`: their count and position are known exactly.
- The text between two special tokens is encoded as one run, as the tokenizer does with the
  whole prompt string (it splits at added tokens, then runs BPE on each run). Encoding a run in
  pieces is not the same: Qwen's BPE glues a space to the next word (`Please segment ` +
  `a red circle` gives a stray `Ġ` and `a`, where the whole string has `Ġa`) and `<|end|>` to
  the punctuation before it. Tests compare every prompt with the whole-string encoding using
  the real Qwen vocabulary (tests/test_templates.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from .stopping import STOP_RULES, EndTextStop


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation turn: `user_start` + input + `assistant_start` + answer + `end_text`."""

    user_start: str
    assistant_start: str  # end of the user turn and start of the assistant turn
    end_text: str  # how an answer ends: the stop text
    # The official STOP_WORDS besides end_text (xtuner's PROMPT_TEMPLATE, which Sa2VA's
    # templates copy); only `model.stop_rule=official` stops on them.
    extra_stop_words: tuple[str, ...] = ()


# xtuner's templates as Sa2VA checkpoints name them in config.json["template"].
CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "phi3_chat": ChatTemplate("<|user|>\n", "<|end|>\n<|assistant|>\n", "<|end|>"),
    "qwen_chat": ChatTemplate(
        "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", ("<|endoftext|>",)
    ),
    "internlm2_chat": ChatTemplate("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
}


# How special-token strings inside caption text are encoded (`model.caption_special_tokens`):
# `text`: as typed, plain BPE; `ids`: as the official whole-string encoding does, their added-token
# ids — except the image and region slot tokens, which stay text: as ids they would take an image
# feature each and break the slot count (the official code prints a shape mismatch there).
CAPTION_SPECIAL_TOKENS = ("text", "ids")
SLOT_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<vp>", "</vp>")


@dataclass(frozen=True)
class TemplateSet:
    """The user's words around the special-token slots.

    Region prompt: `<img>…</img>` + region_between + `<vp>…</vp>` + region_question.
    Segment prompt: `<img>…</img>` + segment_between + " " + caption + segment_after_caption,
    answered by answer_before_seg + `[SEG]` + answer_after_seg.
    """

    region_between: str
    region_question: str
    segment_between: str  # no trailing space: the caption's first word carries its own
    segment_after_caption: str
    answer_before_seg: str
    answer_after_seg: str
    answer_has_end: bool = True  # the answer ends with the chat template's end text


TEMPLATE_SETS: dict[str, TemplateSet] = {
    # What released Sa2VA checkpoints were trained and evaluated with: the visual-prompt format
    # of their predict_forward, the region-caption evaluation's question and the referring
    # segmentation format.
    "sa2va": TemplateSet(
        region_between="\nThere are 1 part regions in the picture: region1",
        # predict_forward ends its region list with ".\n" and the evaluation question starts with
        # "\n" (after `<image>`): a blank line between them.
        region_question=".\n\nPlease give me a short description of the region in the picture marked by region1.",
        segment_between="\nPlease segment",
        segment_after_caption=" in this image.",
        answer_before_seg="It is ",
        answer_after_seg=".",
    ),
    # The design note's strings, with its two-[SEG] suffix reduced to the answer's one.
    "seed": TemplateSet(
        region_between=" Region: ",
        region_question=". Describe this region briefly.",
        segment_between="Please segment:",
        segment_after_caption="",
        answer_before_seg="It is ",
        answer_after_seg=".",
        answer_has_end=False,
    ),
}


class LeadingSpace:
    """How a caption's first token reads after `Please segment`: the whole string has the space
    glued to the first word (`Ġa`), while the teacher generated it at the start of an answer
    (`a`). `twin[v]` is the single id of " " + text(v) where one exists; otherwise the segment
    prompt keeps v and puts a separate space token (`space_id`) before it (`needs_slot[v]`)."""

    def __init__(self, tokenizer, pieces: list[bytes], vocab_size: int):
        texts, ids = [], []
        for token_id, piece in enumerate(pieces):
            try:
                texts.append(" " + piece.decode("utf-8"))
                ids.append(token_id)
            except UnicodeDecodeError:
                continue
        self.twin = torch.arange(vocab_size)
        self.needs_slot = torch.ones(vocab_size, dtype=torch.bool)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for token_id, twin in zip(ids, encoded):
            if len(twin) == 1 and token_id not in special:
                self.twin[token_id] = twin[0]
                self.needs_slot[token_id] = False
        (self.space_id,) = tokenizer(" ", add_special_tokens=False)["input_ids"]
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(twin, needs_slot) on `device`, copied there once (not every step)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = (self.twin.to(device), self.needs_slot.to(device))
        return self._on_device[device]


class PromptBuilder:
    """Builds id sequences for the region-caption prompt and the segmentation prompt."""

    def __init__(
        self,
        tokenizer,
        token_ids: dict[str, int],
        num_image_tokens: int,
        template: str = "sa2va",
        chat_template: str = "phi3_chat",
        vocab_size: int | None = None,
        stop_rule: str = "contains",
        caption_special_tokens: str = "text",
    ):
        if template not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {template!r}; known: {sorted(TEMPLATE_SETS)}")
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {chat_template!r}; known: {sorted(CHAT_TEMPLATES)}")
        self.tokenizer = tokenizer
        self.template = TEMPLATE_SETS[template]
        self.chat = CHAT_TEMPLATES[chat_template]
        self.chat_template = chat_template
        if stop_rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {stop_rule!r}; known: {list(STOP_RULES)}")
        self.stop_rule = stop_rule
        if caption_special_tokens not in CAPTION_SPECIAL_TOKENS:
            raise ValueError(
                f"unknown caption_special_tokens {caption_special_tokens!r}; known: {list(CAPTION_SPECIAL_TOKENS)}"
            )
        self.caption_special_tokens = caption_special_tokens
        added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._caption_specials = {t: i for t, i in added.items() if t not in SLOT_TOKENS}
        self._caption_split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._caption_specials, key=len, reverse=True)) + ")"
        )
        self.num_image_tokens = num_image_tokens
        self.vocab_size = vocab_size or len(tokenizer)
        self.eos_token_id = token_ids["<|im_end|>"]
        self.img_start = token_ids["<img>"]
        self.img_end = token_ids["</img>"]
        self.ctx = token_ids["<IMG_CONTEXT>"]
        self.vp_start = token_ids["<vp>"]
        self.vp_end = token_ids["</vp>"]
        self.seg = token_ids["[SEG]"]

        t, chat = self.template, self.chat
        self._user_start = self._encode_template(chat.user_start)
        self._region_between = self._encode_template(t.region_between)
        self._region_end = self._encode_template(t.region_question + chat.assistant_start)
        self._segment_between = self._encode_template(t.segment_between)
        self._segment_after_caption = self._encode_template(
            t.segment_after_caption + chat.assistant_start + t.answer_before_seg
        )
        self._segment_after_seg = self._encode_template(
            t.answer_after_seg + (chat.end_text if t.answer_has_end else "")
        )
        end = self._encode_template(chat.end_text)
        self._end_special_id = end[0] if len(end) == 1 and end[0] in set(tokenizer.all_special_ids) else None

    def _encode_template(self, text: str) -> list[int]:
        """A template piece: its control tokens (`<|im_start|>` in qwen_chat) are special ids,
        as in the official whole-string encoding."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode(self, text: str) -> list[int]:
        """Caption text -> ids, as one run. Special-token strings inside it (`[SEG] word`) stay
        plain text (`caption_special_tokens="text"`: a caption may spell `<vp>`), or become their
        ids between plain runs as the tokenizer splits a whole string (`"ids"`), slot tokens
        excepted (CAPTION_SPECIAL_TOKENS)."""
        if not text:
            return []
        if self.caption_special_tokens == "text" or not self._caption_specials:
            return self._plain(text)
        ids: list[int] = []
        for piece in self._caption_split.split(text):
            ids += [self._caption_specials[piece]] if piece in self._caption_specials else self._plain(piece)
        return ids

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    @property
    def end_text(self) -> str:
        return self.chat.end_text

    @functools.cached_property
    def stop(self) -> EndTextStop:
        """The caption stop rule (built on first use: a table over the vocabulary)."""
        extra = self.chat.extra_stop_words if self.stop_rule == "official" else ()
        return EndTextStop(
            self.tokenizer, self.chat.end_text, self.eos_token_id, self.vocab_size, self.stop_rule, extra
        )

    @functools.cached_property
    def leading_space(self) -> LeadingSpace:
        return LeadingSpace(self.tokenizer, self.stop.pieces, self.vocab_size)

    def _image_ids(self, num_views: int = 1) -> list[int]:
        """One `<img>` block holding every view's tokens (tiles then thumbnail), as released."""
        return [self.img_start] + [self.ctx] * (self.num_image_tokens * num_views) + [self.img_end]

    def region_prompt(self, num_region_cells: int, num_views: int = 1) -> list[int]:
        """User turn asking for a description of a region of K cells, ending where the answer starts.
        K = 0 writes `region1<vp></vp>` as the official code does for a region no cell samples
        (objective.empty_region_policy=official)."""
        if num_region_cells < 0:
            raise ValueError(f"a region prompt needs K >= 0 region cells, got {num_region_cells}")
        return (
            self._user_start
            + self._image_ids(num_views)
            + self._region_between
            + [self.vp_start]
            + [self.ctx] * num_region_cells
            + [self.vp_end]
            + self._region_end
        )

    def answer_ids(self, caption: str, with_end: bool = False) -> list[int]:
        """A caption as the answer of the region prompt (optionally ended as the model was
        trained to end it: the caption and end text encoded as one run)."""
        if not with_end:
            return self.encode(caption)
        if self._end_special_id is not None:  # qwen_chat / internlm2_chat: <|im_end|> is one id
            return self.encode(caption) + [self._end_special_id]
        return self.encode(caption + self.chat.end_text)

    def segment_caption_ids(self, caption: str) -> list[int]:
        """A caption as it reads inside the segment prompt: with its leading space."""
        return self.encode(" " + caption.strip()) if caption.strip() else []

    def segment_prefix(self, num_views: int = 1) -> list[int]:
        """Ids before the caption in the segmentation prompt."""
        return self._user_start + self._image_ids(num_views) + self._segment_between

    def segment_suffix(self) -> tuple[list[int], int]:
        """Ids after the caption, and the index of the answer's [SEG] inside them."""
        ids = self._segment_after_caption + [self.seg] + self._segment_after_seg
        return ids, len(self._segment_after_caption)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids [B, L], attention_mask [B, L]); generation needs the last
    position of every row to be a real token."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask
