"""elastic: elastic LLM training on real processes, with live resharding between Ray actors."""

__version__ = "0.1.0"
