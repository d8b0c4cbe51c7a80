"""The controller: an explicit state machine over the worker group, the events that drive it (operator,
cluster, training loop), the job's wishes, recovery, the journal, the control plane and workloads."""
