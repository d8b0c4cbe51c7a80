"""The model: a Llama-style decoder, its initialisation, tokenizer and LoRA transform.

Nothing in this package imports ray or torch.distributed (DESIGN.md, invariant 5).
"""
