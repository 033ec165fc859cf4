"""Stopping a caption at the template's end *text*, as the released model was trained to end it.

Sa2VA-4B answers end with the text `<|end|>` (phi3_chat), which is ordinary BPE for Qwen, and
Qwen's BPE glues it to what comes before: `circle.<|end|>` is `circle` `.<` `|` `end` `|` `>`,
`small <|end|>` is `small` `Ġ<|` `end` `|` `>`. The ids of `<|end|>` encoded alone almost never
appear in a generated sequence, so matching ids fails; the official generation decodes the text
and stops when it ends with a stop word.

`EndTextStop` does the same without decoding on the host per token: a table of automaton states
(the longest suffix of the caption's bytes that starts a stop word; Knuth-Morris-Pratt /
Aho-Corasick over the stop words' bytes) indexed by [state, token id] advances every row on the
device with one gather per step; the last state means "stop". At the end of generation, `trim`
cuts each row before the stop word, fragments included: the `.` of `.<` stays (re-encoded
alone), the `<` goes, a space before the tag goes.

Two rules (`model.stop_rule`, docs/fidelity.md):
- `contains` (default): stop as soon as the caption's bytes contain the chat template's end text,
  anywhere in the last token (`|>.` after `<|end` stops too). The answer ends at its first end
  text, however BPE glued the next characters to it.
- `official`: the official `StopWordStoppingCriteria` (Sa2VA's modeling_sa2va_chat.py, from
  xtuner): `\\r` and `\\n` are removed from the decoded text, which must *end with* one of the
  template's STOP_WORDS (`<|end|>`; qwen_chat: `<|im_end|>` and `<|endoftext|>`). An end text
  followed by other characters in the same token does not stop the caption; newlines inside or
  after the end text do not prevent the stop.
"""

from __future__ import annotations

import torch

STOP_RULES = ("contains", "official")
NEWLINES = b"\r\n"


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


class EndTextStop:
    """Stop rule: eos, or a stop word in the decoded caption, by `rule` (see the module doc).

    `end_text` is the chat template's end text; `extra_words` the template's other stop words
    (the official rule's; the `contains` rule stops on the end text alone)."""

    def __init__(
        self,
        tokenizer,
        end_text: str,
        eos_token_id: int | None,
        vocab_size: int | None = None,
        rule: str = "contains",
        extra_words: tuple[str, ...] = (),
    ):
        if not end_text or not all(extra_words):
            raise ValueError("the stop words of a stop rule must not be empty")
        if rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {rule!r}; known: {list(STOP_RULES)}")
        self.tokenizer = tokenizer
        self.rule = rule
        self.end_text = end_text
        self.words = tuple(w.encode() for w in dict.fromkeys((end_text, *extra_words)))
        self.ignore_newlines = rule == "official"
        self.eos_token_id = eos_token_id
        self.pieces = token_bytes(tokenizer)
        vocab_size = max(vocab_size or 0, len(self.pieces))
        # States: every proper prefix of a stop word (b"" first), then the absorbing stop state.
        self.states = list(dict.fromkeys(w[:n] for w in self.words for n in range(len(w))))
        self.states.sort(key=len)
        index = {s: i for i, s in enumerate(self.states)}
        self._state_set = set(self.states)
        m = len(self.states)
        if m > 255:
            raise ValueError(f"stop words too long for the state table ({m} states)")
        table = torch.zeros(m + 1, vocab_size, dtype=torch.uint8)
        table[m] = m  # matched is absorbing
        prefixes = tuple(s for s in self.states if s)
        suffixes = tuple(w[n:] for w in self.words for n in range(len(w)))
        for token_id, raw in enumerate(self.pieces):
            piece = self._clean(raw)
            if not piece:  # newlines only, with newlines ignored: the state does not move
                table[:m, token_id] = torch.arange(m, dtype=torch.uint8)
                continue
            # A piece leads to a state other than 0 only if it lies inside a stop word, ends
            # with a prefix of one (a match may start), or starts with a suffix of one or holds
            # one whole (a match may end inside it).
            if (
                not any(piece in w for w in self.words)
                and not piece.endswith(prefixes)
                and not piece.startswith(suffixes)
                and not any(w in piece for w in self.words)
            ):
                continue
            for state, text in enumerate(self.states):
                after = self._after(text + piece)
                table[state, token_id] = m if after is None else index[after]
        if eos_token_id is not None:
            table[:, eos_token_id] = m
        self.matched_state = m
        self.table = table
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _clean(self, piece: bytes) -> bytes:
        return piece.translate(None, NEWLINES) if self.ignore_newlines else piece

    def _stops(self, text: bytes) -> bool:
        """Whether a caption whose (cleaned) bytes are `text` has stopped, by the rule."""
        if self.rule == "official":
            return text.endswith(self.words)
        return any(w in text for w in self.words)

    def _after(self, text: bytes) -> bytes | None:
        """None if `text` stops the caption, else the longest suffix of it that is a state."""
        if self._stops(text):
            return None
        for length in range(min(len(text), len(self.states[-1])), 0, -1):
            if text[-length:] in self._state_set:
                return text[-length:]
        return b""

    @property
    def stop_token_ids(self) -> torch.Tensor:
        """Ids that stop a caption alone, from any state: eos, and (official rule) a special id
        that is a stop word (qwen_chat's `<|endoftext|>`). Decoding must not suppress them."""
        return (self.table[: self.matched_state] == self.matched_state).all(0).nonzero().flatten()

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
        """Bool [B, V]: ids that would start or continue a stop word (or end the caption) from
        each row's state; forbidding them keeps the first tokens whole caption text."""
        return self._table(states.device)[states] != 0

    def stop_position(self, buffer: bytes) -> int | None:
        """Where in `buffer` (a caption's bytes so far) the stop word that stops it begins, or
        None if the caption has not stopped: the first occurrence (`contains`), or the word the
        newline-free text ends with, mapped back to the raw bytes (`official`)."""
        raw_at = [i for i, byte in enumerate(buffer) if byte not in NEWLINES] if self.ignore_newlines else None
        clean = bytes(buffer[i] for i in raw_at) if raw_at is not None else buffer
        if self.rule == "official":
            word = next((w for w in self.words if clean.endswith(w)), None)
            position = None if word is None else len(clean) - len(word)
        else:
            found = [p for p in (clean.find(w) for w in self.words) if p >= 0]
            position = min(found) if found else None
        if position is None or raw_at is None:
            return position
        return raw_at[position]

    def trim(
        self, tokens: torch.Tensor, num_generated: torch.Tensor, max_len: int, min_len: int = 0
    ) -> tuple[list[int], ...]:
        """Rows of generated ids -> caption ids (a list per row) cut before eos or the stop word.

        Ids wholly before the stop word are kept as generated. The id the stop word starts
        inside (`.<`, `Ġ<|`) is replaced by the encoding of its part before the word (`.`;
        nothing for a space), and whitespace-only ids at the end are dropped — unless that
        would leave fewer than `min_len` ids.
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
                position = self.stop_position(buffer)
                if position is not None:
                    # The stop word may have begun some ids back (`Ġ<|` `end` `|` `>`).
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
