"""Apply a layout to a model with torch's own building blocks (DeviceMesh, DTensor tensor
parallelism, FSDP2 ``fully_shard``, ``torch.distributed.pipelining``).

Functions here take a plain model stage and return it parallelised; the model knows nothing of
this. Every box a parameter ends up with is checked against ``elastic.core.layout`` (the one source
of truth for who holds what).
"""
