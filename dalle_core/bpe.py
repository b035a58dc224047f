"""The text tokenizer: byte-level BPE (Hugging Face `tokenizers`) padded to a fixed length.

DALL-E gives the caption a fixed budget of `text_len` tokens: longer captions
are truncated (and counted), shorter ones padded with `<pad>` (id 0).
Byte-level BPE has all 256 bytes in its alphabet, so nothing is ever unknown.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD = "<pad>"


def train_bpe(captions: Iterable[str], vocab_size: int, lowercase: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


class TextTokenizer:
    """Captions <-> fixed-length id rows."""

    def __init__(self, tokenizer: Tokenizer, text_len: int):
        self.tokenizer = tokenizer
        self.text_len = text_len
        pad = tokenizer.token_to_id(PAD)
        if pad is None:  # a user's tokenizer without our pad token: add one at the end
            tokenizer.add_special_tokens([PAD])
            pad = tokenizer.token_to_id(PAD)
        self.pad_id = pad

    @classmethod
    def from_str(cls, json_text: str, text_len: int) -> TextTokenizer:
        return cls(Tokenizer.from_str(json_text), text_len)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, text_len) int64 ids and a (B,) bool mask of which captions were truncated."""
        out = np.full((len(captions), self.text_len), self.pad_id, dtype=np.int64)
        truncated = np.zeros(len(captions), dtype=bool)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(captions), add_special_tokens=False)):
            ids = enc.ids
            truncated[i] = len(ids) > self.text_len
            ids = ids[: self.text_len]
            out[i, : len(ids)] = ids
        return out, truncated

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) != self.pad_id])
