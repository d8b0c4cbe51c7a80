"""Training recipes: functions that return a Config (plus, for RL, the loop's own pieces).

Recipes import neither ray nor torch.distributed (DESIGN.md, invariant 5).
"""
