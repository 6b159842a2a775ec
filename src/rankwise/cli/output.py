"""Where the commands print: tables and summaries on stdout, errors on stderr.

Made per call, not held in module globals: the stream is looked up when something is printed
(so a test's capture or a redirected stdout is honoured), and off a terminal the width is fixed
wide enough that a log keeps whole table rows.
"""

from __future__ import annotations

import sys

from rich.console import Console

LOG_WIDTH = 160


def stdout() -> Console:
    return Console(width=None if sys.stdout.isatty() else LOG_WIDTH)


def stderr() -> Console:
    return Console(stderr=True)
