"""A progress bar: tqdm when it is installed, else a one-line bar on stderr (no extra dependency).

``bar.write(text)`` prints a line on stdout without tearing the bar (it is redrawn below the line)."""
from __future__ import annotations

import sys
import time


class _StderrBar:
    """Minimal stand-in for ``tqdm(total=..., desc=...)``: ``update``, ``set_postfix_str``, ``close``."""

    def __init__(self, total: int, desc: str, width: int = 28):
        self.total, self.desc, self.width = max(total, 1), desc, width
        self.n, self.postfix, self.start = 0, "", time.perf_counter()
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def write(self, text: str) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        self._draw()

    def close(self) -> None:
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _draw(self) -> None:
        done = min(self.n / self.total, 1.0)
        fill = int(round(done * self.width))
        elapsed = time.perf_counter() - self.start
        bar = "#" * fill + "-" * (self.width - fill)
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.0f}s {self.postfix}"
        sys.stderr.write("\r\033[K" + line[:160])
        sys.stderr.flush()


def progress(total: int, desc: str, enabled: bool = True):
    """A bar over ``total`` units of work; a silent one when ``enabled`` is False."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrBar(total, desc)
    return _Tqdm(tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True))


class _Tqdm:
    """tqdm, with ``write`` going to stdout and flushed (tqdm's own goes through its lock, not always flushed)."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass
