"""Look at what a model says: a Hugging Face folder (plus, optionally, a PEFT adapter) and its own
tokenizer, completing one prompt on this process's CPU. Used by ``elastic generate``.

A tokenizer with a chat template gets the prompt as one user turn with the generation prompt (as
``transformers``' chat pipelines do); ``chat=False`` or a tokenizer without a template completes the
raw text. A byte-level model folder without a tokenizer uses the byte tokenizer. No distributed code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elastic.core.tokenizer import check_vocabulary, load_tokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.hf import load_hf_model, tokenizer_of_folder
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.model.peft_io import load_peft_adapter


def complete(base: str | Path, prompt: str, adapter: str | Path | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, chat: bool = True, seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (greedy when ``temperature`` is 0)."""
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
    if chat and tok.chat_template:
        ids = tok.chat_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(prompt, bos=True)
    if len(ids) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                         f"model's max_position_embeddings={cfg.max_seq_len}")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=(tok.eos_id,))
    with torch.no_grad():
        out, lengths = sample(model.eval(), torch.tensor([ids]), sampling,
                              generators=[torch.Generator().manual_seed(seed)])
    return tok.decode(out[0, : int(lengths[0])].tolist())
