"""The one logger of spotlm: `get_logger(__name__)` everywhere, one line per event."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the `spotlm` hierarchy, configured once to write to stderr."""
    root = logging.getLogger("spotlm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("SPOTLM_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name.split(".", 1)[-1] if name.startswith(("app.", "jobs.", "index.")) else name)
