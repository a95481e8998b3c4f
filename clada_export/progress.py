"""Progress bars for long work: tqdm on stderr that clear themselves when the work fails,
so an error line is never preceded by a half-finished bar."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress(tqdm):
    """``tqdm`` writing to stderr; used as a context manager, an exception clears the bar
    instead of leaving its last state on screen."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stderr)
        super().__init__(*args, **kwargs)

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            self.leave = False
        return super().__exit__(exc_type, exc_value, traceback)
