"""What every benchmark does with its result at the end: print it as JSON, and write it to `--out` if given."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | Path = "") -> None:
    """Print `result` as indented JSON; also write it to `out` (its folder made) unless `out` is empty."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
