"""A model's tokenizer seen token by token: each token with its offsets, and ids back to text.

Both backends hold a `tokenizers.Tokenizer` (no padding, truncation at the model's token
limit); these functions serve their `token_details` and `decode`. Everything here blocks
(briefly) and runs in a worker thread, like the rest of a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Token:
    """One token as the model runs it.

    `start` and `stop` are character offsets into the text (Python string indices), None for
    a special token, which stands for no characters; `text` is the text's own characters,
    or the special token's name (``[CLS]``).
    """

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def token_details(
    tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool = True
) -> list[list[Token]]:
    """Each text's tokens, in order, truncated as the tokenizer is."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [_tokens(text, encoding) for text, encoding in zip(texts, encodings, strict=True)]


def _tokens(text: str, encoding: Any) -> list[Token]:
    tokens: list[Token] = []
    parts = zip(
        encoding.ids,
        encoding.tokens,
        encoding.offsets,
        encoding.special_tokens_mask,
        strict=True,
    )
    for token_id, name, (start, stop), special in parts:
        if special:
            tokens.append(Token(token_id, name, True, None, None))
        else:
            tokens.append(Token(token_id, text[start:stop], False, start, stop))
    return tokens


def decode_ids(
    tokenizer: Any, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
) -> list[str]:
    """Each id sequence as text. Ids outside the vocabulary are skipped (the tokenizer's
    own behaviour), so any list of non-negative integers decodes."""
    decoded = tokenizer.decode_batch(
        [list(row) for row in ids], skip_special_tokens=skip_special_tokens
    )
    return [str(text) for text in decoded]


class TokenizerViews:
    """`token_details` and `decode` of the `Backend` protocol, for a backend whose
    `_tokenizer` is a `tokenizers.Tokenizer`."""

    _tokenizer: Any

    def token_details(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[Token]]:
        """Each text's tokens with their text and character offsets."""
        return token_details(self._tokenizer, texts, add_special_tokens=add_special_tokens)

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Each id sequence back to text; ids outside the vocabulary are skipped."""
        return decode_ids(self._tokenizer, ids, skip_special_tokens=skip_special_tokens)
