"""Prompt templates as configuration: named sets of fixed text pieces, tokenised once.

Ids are spliced, never produced by tokenising a string that contains `<IMG_CONTEXT>` or `[SEG]`:
the image slots, the region slots and the single [SEG] are inserted as ids, so their count and
position are known exactly whatever the tokenizer does with the surrounding text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TemplateSet:
    """Text around the special-token slots. `{ctx}` = image tokens, `{vp}` = region tokens."""

    user_start: str  # before <img>
    region_between: str  # between </img> and <vp>
    region_question: str  # after </vp>, end of user turn
    segment_between: str  # between </img> and the caption
    segment_after_caption: str  # after the caption, up to the answer's [SEG]
    segment_after_seg: str  # after [SEG]
    assistant_start: str  # end of the user turn + start of the assistant turn
    end_text: str  # the template's end-of-turn text (a stop string for captions)


TEMPLATE_SETS: dict[str, TemplateSet] = {
    # What released Sa2VA checkpoints were trained on (phi3-style plain text for the 4B model).
    "sa2va": TemplateSet(
        user_start="<|user|>\n",
        region_between="\nThere are 1 part regions in the picture: region1",
        region_question=".\nPlease give me a short description of region1.",
        segment_between="\nPlease segment ",
        segment_after_caption=" in this image.<|end|>\n<|assistant|>\nIt is ",
        segment_after_seg=".<|end|>",
        assistant_start="<|end|>\n<|assistant|>\n",
        end_text="<|end|>",
    ),
    # The design note's strings, with its two-[SEG] suffix reduced to the answer's one.
    "seed": TemplateSet(
        user_start="<|user|>\n",
        region_between=" Region: ",
        region_question=". Describe this region briefly.",
        segment_between="Please segment: ",
        segment_after_caption="<|end|>\n<|assistant|>\nIt is ",
        segment_after_seg=".",
        assistant_start="<|end|>\n<|assistant|>\n",
        end_text="<|end|>",
    ),
}


class PromptBuilder:
    """Builds id sequences for the region-caption prompt and the segmentation prompt."""

    def __init__(self, tokenizer, token_ids: dict[str, int], num_image_tokens: int, template: str = "sa2va"):
        if template not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {template!r}; known: {sorted(TEMPLATE_SETS)}")
        self.template = TEMPLATE_SETS[template]
        self.num_image_tokens = num_image_tokens
        self.img_start = token_ids["<img>"]
        self.img_end = token_ids["</img>"]
        self.ctx = token_ids["<IMG_CONTEXT>"]
        self.vp_start = token_ids["<vp>"]
        self.vp_end = token_ids["</vp>"]
        self.seg = token_ids["[SEG]"]

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False) if text else []

        t = self.template
        self._user_start = encode(t.user_start)
        self._region_between = encode(t.region_between)
        self._region_end = encode(t.region_question + t.assistant_start)
        self._segment_between = encode(t.segment_between)
        self._segment_after_caption = encode(t.segment_after_caption)
        self._segment_after_seg = encode(t.segment_after_seg)
        self.end_text_ids = encode(t.end_text)

    def _image_ids(self) -> list[int]:
        return [self.img_start] + [self.ctx] * self.num_image_tokens + [self.img_end]

    def region_prompt(self, num_region_cells: int) -> list[int]:
        """User turn asking for a description of a region of K cells, ending where the answer starts."""
        if num_region_cells < 1:
            raise ValueError(f"a region prompt needs K >= 1 region cells, got {num_region_cells}")
        return (
            self._user_start + self._image_ids() + self._region_between
            + [self.vp_start] + [self.ctx] * num_region_cells + [self.vp_end] + self._region_end
        )

    def segment_prefix(self) -> list[int]:
        """Ids before the caption in the segmentation prompt."""
        return self._user_start + self._image_ids() + self._segment_between

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
            ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask
