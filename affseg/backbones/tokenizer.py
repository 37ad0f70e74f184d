"""CLIP byte-pair tokenizer, offline (the BPE vocabulary file ships with open_clip).

UniCL and CLIP share the vocabulary: 49,408 ids, start-of-text 49406, end-of-text 49407.
Texts are cleaned (ftfy, HTML unescape, whitespace, lower case), wrapped in SOT ... EOT and
zero-padded to the context length; a text too long is cut so that EOT stays the last token.
"""

from __future__ import annotations

from functools import lru_cache

from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    ids = (len(tokenizer.encoder), tokenizer.sot_token_id, tokenizer.eot_token_id)
    if ids != (VOCAB_SIZE, SOT_TOKEN_ID, EOT_TOKEN_ID):
        raise RuntimeError(f"open_clip's BPE vocabulary changed: (size, SOT, EOT) = {ids}")
    return tokenizer


def tokenize(texts: str | list[str]) -> Tensor:
    """Token ids ``(N, 77)`` int64 for one text or a list of N texts."""
    if isinstance(texts, str):
        texts = [texts]
    tokens = _bpe()(list(texts), context_length=CONTEXT_LENGTH)
    return tokens.long()
