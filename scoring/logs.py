"""How the project's processes log: one line format for the app, the stages and the command-line tools.

Logs hold counts, timings and model names, never an image, a file name from an upload or a DICOM tag
(docs/app.md, "Privacy"); this module only says how a line looks.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """The root logger at `level`, in LOG_FORMAT (a no-op where logging is already configured)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
