"""``python -m launch ...`` is the ``elastic`` command (handy where the console script is not installed)."""

import sys

from launch.cli import main

sys.exit(main())
