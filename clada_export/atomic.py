"""Files written whole or not at all: written beside the target, then renamed over it,
so a crash never leaves half a file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """``json.dump(obj)`` into ``path`` atomically (the parent directory must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)
