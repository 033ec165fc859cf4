"""Stopping a caption at the template's end *text*, as the released model was trained to end it.

Sa2VA-4B answers end with the text `<|end|>` (phi3_chat), which is ordinary BPE for Qwen, and
Qwen's BPE glues it to what comes before: `circle.<|end|>` is `circle` `.<` `|` `end` `|` `>`,
`small <|end|>` is `small` `Ġ<|` `end` `|` `>`. The ids of `<|end|>` encoded alone almost never
appear in a generated sequence, so matching ids fails; the official generation decodes the text
and stops when it ends with the end text.

`EndTextStop` does the same without decoding on the host per token: a table of automaton states
(Knuth-Morris-Pratt over the end text's bytes) indexed by [state, token id] advances every row
on the device with one gather per step; state `len(end)` means the end text has appeared. At the
end of generation, `trim` cuts each row before the end text, fragments included: the `.` of
`.<` stays (re-encoded alone), the `<` goes, a space before the tag goes.
"""

from __future__ import annotations

import torch


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each id stands for: byte-level BPE tokens through the byte-to-unicode map,
    added tokens as their content; ids a byte-level map cannot read fall back to decode()."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode())
        elif piece is not None and all(c in char_to_byte for c in piece):
            out.append(bytes(char_to_byte[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).encode())
    return out


def _advance(state: int, piece: bytes, end: bytes) -> int:
    """KMP state after `piece`: len(end) if the end text is complete, else the length of the
    longest prefix of `end` that the text now ends with."""
    text = end[:state] + piece
    if end in text:
        return len(end)
    for length in range(min(len(end) - 1, len(text)), 0, -1):
        if text.endswith(end[:length]):
            return length
    return 0


class EndTextStop:
    """Stop rule: eos, or the end text appearing in the decoded caption (see the module doc)."""

    def __init__(self, tokenizer, end_text: str, eos_token_id: int | None, vocab_size: int | None = None):
        if not end_text:
            raise ValueError("the end text of a stop rule must not be empty")
        self.tokenizer = tokenizer
        self.end_text = end_text
        self.end = end_text.encode()
        self.eos_token_id = eos_token_id
        self.pieces = token_bytes(tokenizer)
        vocab_size = max(vocab_size or 0, len(self.pieces))
        m = len(self.end)
        table = torch.zeros(m + 1, vocab_size, dtype=torch.uint8)
        table[m] = m  # matched is absorbing
        prefixes = [self.end[:length] for length in range(1, m)]
        for token_id, piece in enumerate(self.pieces):
            # Only a piece that completes the end text (holds its last byte), ends with a prefix
            # of it, or lies inside it (continuing a partial match) leads to a state other than 0.
            if self.end[-1:] not in piece and not piece.endswith(tuple(prefixes)) and piece not in self.end:
                continue
            for state in range(m):
                table[state, token_id] = _advance(state, piece, self.end)
        if eos_token_id is not None:
            table[:, eos_token_id] = m
        self.matched_state = m
        self.table = table
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.table.to(device=device, dtype=torch.long)
        return self._on_device[device]

    def initial(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def advance(self, states: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """[B] states after each row's next token (one gather, no host sync)."""
        return self._table(states.device)[states, next_ids]

    def matched(self, states: torch.Tensor) -> torch.Tensor:
        return states == self.matched_state

    def end_starting(self, states: torch.Tensor) -> torch.Tensor:
        """Bool [B, V]: ids that would start or continue the end text (or end the caption) from
        each row's state; forbidding them keeps the first tokens whole caption text."""
        return self._table(states.device)[states] != 0

    def trim(
        self, tokens: torch.Tensor, num_generated: torch.Tensor, max_len: int, min_len: int = 0
    ) -> tuple[list[int], ...]:
        """Rows of generated ids -> caption ids (a list per row) cut before eos or the end text.

        Ids wholly before the end text are kept as generated. The id the end text starts inside
        (`.<`, `Ġ<|`) is replaced by the encoding of its part before the end (`.`; nothing for a
        space), and whitespace-only ids at the end are dropped — unless that would leave fewer
        than `min_len` ids.
        """
        captions = []
        for row, count in zip(tokens.tolist(), num_generated.tolist()):
            row = row[:count]
            kept, starts, tail, buffer = [], [], [], b""
            for token_id in row:
                if token_id == self.eos_token_id:
                    break
                kept.append(token_id)
                starts.append(len(buffer))
                buffer += self._piece(token_id)
                position = buffer.find(self.end)
                if position >= 0:
                    # The end text may have begun some ids back (`Ġ<|` `end` `|` `>`).
                    inside = max(i for i, start in enumerate(starts) if start <= position)
                    before = buffer[starts[inside] : position].decode("utf-8", errors="ignore").rstrip()
                    kept, tail = kept[:inside], self.encode(before)
                    break
            ids = kept + tail
            while ids and not self._piece(ids[-1]).strip():
                ids.pop()
            captions.append((ids if len(ids) >= min_len else kept + tail)[:max_len])
        return tuple(captions)

    def _piece(self, token_id: int) -> bytes:
        return self.pieces[token_id] if token_id < len(self.pieces) else b""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
