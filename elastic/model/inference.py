"""Look at what a model says: a Hugging Face folder (plus, optionally, a PEFT adapter) and its own
tokenizer, completing prompts in batches on this process's CPU. Used by ``elastic generate``.

Prompts come as TRL's prompt formats do: a text, or a conversation (a list of ``{"role", "content"}``).
A text goes to a tokenizer with a chat template as one user turn with the generation prompt (as
``transformers``' chat pipelines do); ``chat=False`` or a tokenizer without a template completes the
raw text. A conversation always goes through the template. ``read_prompts`` reads them from a file:
one text per line (``.txt``), or rows of a JSON/JSONL/Parquet file with a ``prompt`` column (text or
conversation) or a ``messages`` one (the conversation up to its last user turn).

Batches are left-padded (``generate.sample``'s ``prompt_mask``), and each prompt samples from its own
generator, seeded by (seed, the prompt's index in the input), so a completion is the same whatever the
batch size. Generation stops at the tokenizer's EOS and at every ``eos_token_id`` the folder's
``generation_config.json`` names (Qwen2.5-Instruct: ``<|im_end|>`` and ``<|endoftext|>``). A byte-level
model folder without a tokenizer uses the byte tokenizer. No distributed code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import check_vocabulary, load_tokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.hf import load_hf_model, tokenizer_of_folder
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.model.peft_io import load_peft_adapter

Prompt = str | list[dict]


@dataclass
class Loaded:
    """A model ready to sample: the module (eval mode), its tokenizer, its context length and stop tokens."""

    model: LlamaStage
    tok: object
    max_seq_len: int
    stop_ids: tuple[int, ...]


def stop_ids_of(folder: Path, eos_id: int) -> tuple[int, ...]:
    """The tokenizer's EOS plus the ``eos_token_id``(s) of the folder's generation_config.json, if it has one."""
    ids = [eos_id]
    path = folder / "generation_config.json"
    if path.is_file():
        named = json.loads(path.read_text()).get("eos_token_id")
        ids += [named] if isinstance(named, int) else list(named or [])
    return tuple(dict.fromkeys(ids))


def load(base: str | Path, adapter: str | Path | None = None) -> Loaded:
    """The model in ``base`` (float32), with the PEFT adapter in ``adapter`` applied, and its tokenizer."""
    base = Path(base)
    cfg, state = load_hf_model(base, dtype=torch.float32)
    tok = load_tokenizer(tokenizer_of_folder(base, cfg))
    check_vocabulary(tok, cfg.vocab_size, f"the model in {base}")
    model = LlamaStage(cfg)
    model.load_state_dict(state, strict=True)
    if adapter is not None:
        lora_cfg, adapters = load_peft_adapter(adapter, cfg)
        apply_lora(model, lora_cfg)
        model.load_state_dict({k: v.float() for k, v in adapters.items()}, strict=False)
    return Loaded(model.eval(), tok, cfg.max_seq_len, stop_ids_of(base, tok.eos_id))


def encode(tok, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of one prompt (see the module docstring for when the chat template applies)."""
    if isinstance(prompt, list):
        return tok.chat_ids(prompt, add_generation_prompt=True)
    if chat and getattr(tok, "chat_template", None):
        return tok.chat_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.encode(prompt, bos=True)


def _prompt_of(row: dict, where: str) -> Prompt:
    if row.get("prompt") is not None:  # (a table's rows carry every column, None where a row has none)
        prompt = row["prompt"]
    elif row.get("messages") is not None:  # a conversation: generate the reply to its last user turn
        messages = list(row["messages"])
        while messages and messages[-1].get("role") != "user":
            messages.pop()
        prompt = messages
    else:
        raise ValueError(f"{where}: columns {sorted(row)} have neither 'prompt' (a text or a conversation) nor "
                         "'messages'; TRL's prompt formats need one of them")
    if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
        raise ValueError(f"{where}: the prompt is empty or neither a text nor a list of messages")
    return prompt


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a file: one per line of a ``.txt`` (empty lines skipped), or one per row of a
    JSON/JSONL/Parquet file (``prompt`` or ``messages``)."""
    from elastic.core.sft_data import read_rows

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix in (".txt", ""):
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [_prompt_of(row, f"{path} row {i}") for i, row in enumerate(read_rows(path))]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@torch.no_grad()
def generate(loaded: Loaded, prompts: Sequence[Prompt], sampling: SamplingConfig, chat: bool = True,
             seed: int = 0, batch_size: int = 8) -> list[str]:
    """The completion of each prompt, in order (greedy when ``sampling.temperature`` is 0)."""
    ids = [encode(loaded.tok, p, chat) for p in prompts]
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) + sampling.max_new_tokens > loaded.max_seq_len:
        raise ValueError(f"prompt {longest} has {len(ids[longest])} tokens; with max_new_tokens="
                         f"{sampling.max_new_tokens} that exceeds the model's max_position_embeddings="
                         f"{loaded.max_seq_len}; shorten it or lower --max_new_tokens")
    sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_p, loaded.stop_ids)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(row) for row in chunk)
        pad = loaded.tok.pad_id
        batch = torch.tensor([[pad] * (width - len(row)) + row for row in chunk])
        mask = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in chunk])
        gens = [torch.Generator().manual_seed(stable_seed(seed, "generate", start + i)) for i in range(len(chunk))]
        tokens, lengths = sample(loaded.model, batch, sampling, gens, prompt_mask=None if mask.all() else mask)
        for r in range(len(chunk)):
            row = tokens[r, : int(lengths[r])].tolist()
            out.append(loaded.tok.decode(row[:-1] if row and row[-1] in loaded.stop_ids else row))
    return out


def complete(base: str | Path, prompt: str, adapter: str | Path | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, chat: bool = True, seed: int = 0) -> str:
    """The model's continuation of one ``prompt`` (greedy when ``temperature`` is 0)."""
    return generate(load(base, adapter), [prompt], SamplingConfig(max_new_tokens, temperature), chat, seed)[0]
