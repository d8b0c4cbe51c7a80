"""The driver's side of the worker boundary: the ``WorkerGroup`` protocol and its Ray implementation, the
resharder (transfer, then commit), snapshots, checkpoints through the group, and step summaries."""
