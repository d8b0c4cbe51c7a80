"""What a run records: the kinds of entries in its ``events.jsonl`` (see ``elastic.tools.metrics``).

The controller writes one entry per thing that happened, ``{"kind": ..., "step": ..., "time": ...,
"text": ..., ...}``. The plot, the CLI and the tests read entries by these kinds, so the names live
here, below every layer that writes or reads them. Values are the strings in the file.
"""

from __future__ import annotations

import enum


class RecordKind(enum.StrEnum):
    TRANSITION = "transition"  # the controller changed state (``from``, ``to``)
    WORKERS = "workers"  # the first workers started
    REDUNDANCY = "redundancy"  # what protects the state (replicas, snapshots)
    EVENT = "event"  # an event arrived (``type``)
    DECISION = "decision"  # the policy chose a placement to move to
    KEEP = "keep"  # the policy chose to stay
    REFUSED = "refused"  # an operator request or a layout was refused (``text`` says why)
    START = "start"  # the first placement was built from the seed
    RESUME = "resume"  # the first placement was loaded from a checkpoint
    RESHARD = "reshard"  # a live reshard finished (``seconds``, ``bytes``, ``old``, ``new``, ``reason``)
    RESHARD_FAILED = "reshard failed"
    FAILURE = "failure"  # workers died or failed (``dead``)
    RECOVERED = "recovered"  # the job recovered (``seconds``, ``how``, ``steps_lost``)
    PAUSE = "pause"
    STOP = "stop"
    SCALE_OUT = "scale-out"  # workers are being started
    SCALE_IN = "scale-in"  # starting workers were cancelled
    WORKERS_READY = "workers ready"
    DRAINED = "drained"  # workers left after their shards moved off them
    CHECKPOINT = "checkpoint"
    EXPORT = "export"  # the workers wrote the run's model (``folders``, ``writers``, ``driver_bytes``)
    EVAL = "eval"  # an evaluation on the held-out rows (``eval_loss``, ``eval_samples``, ``eval_runtime``)
