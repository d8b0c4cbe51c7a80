"""Small Hugging Face model folders built offline, for tests and examples (no hub is needed).

``write_tokenizer``: a byte-level BPE trained by ``tokenizers`` on local text (the standard library's
source), with ChatML special tokens and chat template (as Qwen2's), saved by transformers'
``save_pretrained``. ``write_model``: a random small model of a family, saved the same way. The
loaders read these with the same code that reads a downloaded folder. Imports torch and
transformers only when called.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(max_bytes: int = 300_000) -> list[str]:
    """Local text to train on: the standard library's own source."""
    out, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total > max_bytes:
            break
    return out


def write_tokenizer(folder: Path, vocab_size: int = 400, chat_template: str | None = CHATML) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


def write_model(folder: Path, family: str = "qwen2", seed: int = 0, **config) -> Path:
    """A random small causal LM of ``family`` (transformers' own classes), saved to ``folder``."""
    import torch
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    shape = dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(classes[family](**{**shape, **config}))
    model.save_pretrained(folder)
    return folder
