"""``python -m finsight``: the same command as ``finsight``."""

import sys

from finsight.cli import entry

sys.exit(entry())
