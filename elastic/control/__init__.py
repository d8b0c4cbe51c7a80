"""Controller layer: the worker group, events, policy and the reconfiguration state machine."""
