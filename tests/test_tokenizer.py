"""CLIP BPE tokenizer: exact ids, padding, truncation."""

import torch

from affseg.backbones.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, PAD_TOKEN_ID, SOT_TOKEN_ID, tokenize


def _expected(ids: list[int]) -> torch.Tensor:
    row = torch.full((CONTEXT_LENGTH,), PAD_TOKEN_ID, dtype=torch.long)
    row[: len(ids)] = torch.tensor(ids)
    return row


def test_known_ids():
    tokens = tokenize("a photo of a dog")
    assert tokens.dtype == torch.long and tokens.shape == (1, CONTEXT_LENGTH)
    assert torch.equal(tokens[0], _expected([49406, 320, 1125, 539, 320, 1929, 49407]))


def test_origami_prompt_ids():
    tokens = tokenize(["a clean origami aeroplane."])
    assert torch.equal(tokens[0], _expected([49406, 320, 3772, 31832, 27735, 3980, 269, 49407]))


def test_batch_pads_each_row_after_its_own_eot():
    texts = ["dog", "a clean origami dog.", "a photo of a big brown dog on the grass"]
    tokens = tokenize(texts)
    assert tokens.shape == (3, CONTEXT_LENGTH)
    for row, text in zip(tokens, texts):
        assert torch.equal(row, tokenize(text)[0])  # batching does not change a row
        end = int((row == EOT_TOKEN_ID).nonzero()[0])
        assert row[0] == SOT_TOKEN_ID
        assert (row[end + 1 :] == PAD_TOKEN_ID).all()
        assert (row[1:end] != PAD_TOKEN_ID).all()
    lengths = [(row != PAD_TOKEN_ID).sum().item() for row in tokens]
    assert lengths == [3, 7, 12]


def test_long_text_is_truncated_with_eot_last():
    tokens = tokenize("dog " * 200)[0]
    assert tokens[0] == SOT_TOKEN_ID
    assert tokens[CONTEXT_LENGTH - 1] == EOT_TOKEN_ID
    assert (tokens[1 : CONTEXT_LENGTH - 1] == tokenize("dog")[0, 1]).all()
