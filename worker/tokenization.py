"""Turn prompt segments into token ids without letting client text become control tokens.

A plain `tokenizer(text)` maps the string `<end_of_turn>` inside a user's prompt to the real
control token, which would let a client close the user turn and write the model's answer
itself. Control tokens are therefore only ever inserted by id, and every piece of text is
encoded with `split_special_tokens=True`, so such strings stay plain text.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from guardfleet.prompts import Segment, Special


def special_id(tokenizer: PreTrainedTokenizerBase, special: Special) -> int:
    token_id = tokenizer.convert_tokens_to_ids(special.token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no control token {special.token!r}")
    return token_id


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return list(ids)


def encode_segments(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment]) -> list[int]:
    ids: list[int] = []
    for segment in segments:
        if isinstance(segment, Special):
            ids.append(special_id(tokenizer, segment))
        else:
            ids.extend(encode_text(tokenizer, segment))
    return ids
