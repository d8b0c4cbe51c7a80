"""Training recipes, one folder each: ``pretrain/``, ``lora/``, ``grpo/`` (see ``recipe.py``).

A recipe's config builders and training math import neither ray nor torch.distributed (DESIGN.md,
invariant 5; checked by import-linter). Its worker-side tasks use the runtime and its driver-side
workload the controller, each in a module of its own.
"""
