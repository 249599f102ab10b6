"""Turn prompt segments into token ids without letting client text become control tokens.

A plain `tokenizer(text)` maps the string `<end_of_turn>` inside a user's prompt to the real
control token, which would let a client close the user turn and write the model's answer
itself. Control tokens are therefore only ever inserted by id, and every piece of text goes
through a `TextEncoder`: a private copy of the Rust tokenizer that is put in "encode special
tokens as text" mode once, when it is built, and never changed.

Asking transformers for `split_special_tokens=True` per call is not enough: it flips that mode
on the tokenizer object shared by every thread, so any plain `encode` running concurrently (on
another task thread) could switch it back between the flip and our encode.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from guardfleet.prompts import Segment, Special


def special_id(tokenizer: PreTrainedTokenizerBase, special: Special) -> int:
    token_id = tokenizer.convert_tokens_to_ids(special.token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no control token {special.token!r}")
    return token_id


class TextEncoder:
    """Encodes client text as plain text, always, whatever else uses the tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend: Tokenizer = tokenizer.backend_tokenizer
        self._text = Tokenizer.from_str(backend.to_str())
        self._text.no_truncation()
        self._text.no_padding()
        self._text.encode_special_tokens = True
        self._specials: dict[str, int] = {}

    def text(self, text: str) -> list[int]:
        return list(self._text.encode(text, add_special_tokens=False).ids)

    def segments(self, segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for segment in segments:
            if isinstance(segment, Special):
                if segment.token not in self._specials:
                    self._specials[segment.token] = special_id(self.tokenizer, segment)
                ids.append(self._specials[segment.token])
            else:
                ids.extend(self.text(segment))
        return ids


_ENCODERS: dict[int, TextEncoder] = {}


def encoder_for(tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    """The `TextEncoder` of a tokenizer, built once (the copy costs a few milliseconds)."""
    encoder = _ENCODERS.get(id(tokenizer))
    if encoder is None or encoder.tokenizer is not tokenizer:
        encoder = _ENCODERS[id(tokenizer)] = TextEncoder(tokenizer)
    return encoder


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return encoder_for(tokenizer).text(text)


def encode_segments(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment]) -> list[int]:
    return encoder_for(tokenizer).segments(segments)
