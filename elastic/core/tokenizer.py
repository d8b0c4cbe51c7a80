"""A byte-level tokenizer: every UTF-8 byte is a token, plus three special tokens.

No vocabulary files and no downloads: any text round-trips exactly.
"""

from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, VOCAB_SIZE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == EOS and stop_at_eos:
                break
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")
