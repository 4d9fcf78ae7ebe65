"""The command line's progress bar: tqdm behind the library's progress(done, total[, info]) callable."""

import sys

from tqdm import tqdm


class ProgressBar:
    """Call with (done, total[, info]); draws on `stream` (stderr, in ASCII whatever its encoding) at most
    every `interval` seconds and at the end, with rate and ETA counted from the first call (a resumed run
    starts part-way)."""

    def __init__(self, label: str, stream=None, interval: float = 0.5):
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self._bar = None

    def __call__(self, done: int, total: int, info: dict = None) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total, initial=done, desc=self.label, file=self.stream, mininterval=self.interval, ascii=True
            )
        self._bar.total = total
        if info:
            self._bar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in info.items()), refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()

    def close(self) -> None:
        """End a bar left part-way (by an error), so the next message starts on its own line."""
        if self._bar is not None:
            self._bar.close()  # tqdm writes nothing for a bar already closed
