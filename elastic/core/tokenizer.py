"""Tokenizers: the built-in byte tokenizer, and a Hugging Face folder's own tokenizer.

``ByteTokenizer``: every UTF-8 byte is a token, plus three special tokens. No vocabulary files and
no downloads: any text round-trips exactly. It is the default for the built-in model presets.

``HFTokenizer``: the tokenizer saved in a model folder (``tokenizer.json``, ``tokenizer_config.json``
and its special tokens), loaded by transformers' ``AutoTokenizer`` with local files only. We use
transformers rather than ``tokenizers`` plus our own Jinja rendering so that special tokens, the
chat template and its helpers (``raise_exception``, ``strftime_now``, ``add_generation_prompt``)
behave exactly as they do for transformers and TRL users; ``tokenizers`` does the encoding below it.

Both expose ``bos_id``/``eos_id``/``pad_id``, ``vocab_size`` (every id the tokenizer can emit is
below it), ``encode``, ``decode`` and ``chat_ids`` (None for the byte tokenizer, which has no
chat template). Imports transformers only when a folder's tokenizer is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, VOCAB_SIZE
    chat_template = None
    where = "the byte tokenizer"

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

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        raise ValueError("conversational data needs a chat template, and the byte tokenizer has none; "
                         "set data.tokenizer to a model folder whose tokenizer has one")


class HFTokenizer:
    """A model folder's tokenizer (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = folder = Path(folder)
        self.where = f"the tokenizer of {folder}"
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"{folder} has no tokenizer (none of {list(TOKENIZER_FILES)}); save one there "
                                    "with tokenizer.save_pretrained, or leave data.tokenizer empty for bytes")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{folder}: transformers cannot load its tokenizer ({err})") from err
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{folder}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        # No pad token (Llama 3): pad with EOS, as TRL does; padded positions never carry loss.
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)
        self.chat_template = self.tok.chat_template

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """``bos``: the tokenizer's own special tokens around a text (its BOS, if it has one)."""
        ids = self.tok.encode(text, add_special_tokens=bos)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        ids = [int(i) for i in ids]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of ``messages`` rendered with the folder's chat template."""
        if not self.chat_template:
            raise ValueError(f"{self.folder}: conversational data needs a chat template and this tokenizer has "
                             "none; add 'chat_template' to tokenizer_config.json (or a chat_template.jinja file)")
        rendered: Any = self.tok.apply_chat_template(messages, tokenize=True,
                                                     add_generation_prompt=add_generation_prompt)
        ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        return list(ids)


def load_tokenizer(folder: str | Path | None):
    """The folder's tokenizer, or the byte tokenizer when ``folder`` is empty."""
    return HFTokenizer(folder) if folder else ByteTokenizer()


def check_vocabulary(tokenizer, vocab_size: int, model_where: str = "the model") -> None:
    """Refuse a tokenizer that emits ids the model has no embedding for.

    A model may have more rows than its tokenizer has tokens (vocabularies are padded to a multiple
    of 64 or 128, e.g. Qwen2.5), so only a larger tokenizer is an error.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{tokenizer.where} has {tokenizer.vocab_size} tokens but {model_where} has vocab_size="
                         f"{vocab_size}: ids >= {vocab_size} have no embedding; use the model's own tokenizer")
