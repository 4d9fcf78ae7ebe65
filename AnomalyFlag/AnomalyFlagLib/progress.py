"""A plain-text progress bar with rate and ETA for the command line (no extra dependency)."""

import math
import sys
import time


class ProgressBar:
    """Call with (done, total[, info]); redraws at most every `interval` seconds and at the end."""

    def __init__(self, label: str, stream=None, interval: float = 0.5, width: int = 28):
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.width = width
        self.start = time.monotonic()
        self.last = 0.0
        self.first = None  # the count at the first call (a resumed run starts part-way)
        self.open = False  # a line is drawn and not yet ended

    def __call__(self, done: int, total: int, info: dict = None) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        if self.first is None:
            self.first = done
        elapsed = now - self.start
        frac = done / total if total else 1.0
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        filled = int(self.width * frac)
        extra = "  " + " ".join(f"{k} {v:.4g}" for k, v in info.items()) if info else ""
        timing = f"{elapsed:5.0f}s elapsed" + (f", ETA {eta:4.0f}s" if math.isfinite(eta) else "")
        line = f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {timing}{extra}"
        self.stream.write(line)
        self.open = done < total
        if not self.open:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        """End a bar left part-way (by an error), so the next message starts on its own line."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
