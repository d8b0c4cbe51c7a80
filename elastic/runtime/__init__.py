"""What runs inside a worker process: the Ray actor, its engine (model stage, optimizer shard, data
cursor), typed tasks, the point-to-point transfer, torch's parallel building blocks (``parallel/``) and
every private torch API (``torch_compat.py``)."""
