"""The ``elastic`` command line (``python -m launch`` works too)."""
