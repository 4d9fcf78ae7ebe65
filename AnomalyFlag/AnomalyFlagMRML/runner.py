"""Background work without Qt: a runner the Widget polls from a QTimer (tests poll it directly).

The worker function receives `progress(done, total)`, `log(text)` and `cancelRequested()` callables as
keyword arguments (besides the caller's keyword arguments); it must not touch MRML. Events are tuples:
("progress", done, total), ("log", text), ("done", result), ("error", exception, traceback_text),
("cancelled",). Exactly one of done/error/cancelled ends every run.
"""

import logging
import queue
import threading
import traceback
from typing import Any, Callable, List, Tuple

try:
    from typing import Protocol
except ImportError:  # Python < 3.8
    Protocol = object

from AnomalyFlagLib.errors import CancelledError


class BackgroundRunner(Protocol):
    def start(self, fn: Callable[..., Any], **kwargs) -> None: ...

    def poll(self) -> List[Tuple]: ...

    def cancel(self) -> None: ...

    def isRunning(self) -> bool: ...


class ThreadRunner:
    """Runs one function at a time in a daemon `threading.Thread`; events are queued for `poll()`."""

    def __init__(self, name: str = "AnomalyFlag worker"):
        self.name = name
        self._events = queue.Queue()
        self._cancel = threading.Event()
        self._thread = None

    def start(self, fn, **kwargs):
        if self.isRunning():
            raise RuntimeError("AnomalyFlag: a background run is already in progress.")
        self._cancel.clear()
        self._events = queue.Queue()
        events = self._events
        cancelEvent = self._cancel

        def progress(done, total):
            events.put(("progress", int(done), int(total)))

        def log(text):
            events.put(("log", str(text)))

        def cancelRequested():
            return cancelEvent.is_set()

        def work():
            try:
                result = fn(progress=progress, log=log, cancelRequested=cancelRequested, **kwargs)
            except CancelledError:
                events.put(("cancelled",))
            except BaseException as exc:  # reported to the GUI thread, never lost
                if cancelEvent.is_set() and isinstance(exc, KeyboardInterrupt):
                    events.put(("cancelled",))
                else:
                    logging.debug("AnomalyFlag worker failed", exc_info=True)
                    events.put(("error", exc, traceback.format_exc()))
            else:
                events.put(("cancelled",) if cancelEvent.is_set() and result is None else ("done", result))

        self._thread = threading.Thread(target=work, name=self.name, daemon=True)
        self._thread.start()

    def poll(self):
        """Events since the last poll, oldest first (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def cancel(self):
        """Ask the worker to stop at its next `cancelRequested()` check."""
        self._cancel.set()

    def isRunning(self):
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout=None):
        """Block until the worker finishes (for tests and the Python console); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.isRunning()
