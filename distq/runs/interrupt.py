"""SIGINT and SIGTERM (what Ctrl-C, cluster schedulers and `ray stop` send): a run stops at a safe point.

A signal handler runs between two bytecodes of the main thread, possibly inside a checkpoint write or a Ray call;
while a run defers signals the handler only records the signal, and the training loop stops after its episode.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A command stopped by SIGINT or SIGTERM; the message says what was kept. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it. The CLI exits with 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


class Signals:
    """Inside `with` (main thread only; elsewhere, e.g. in a Tune trial, signals are someone else's): SIGINT and
    SIGTERM call `on_signal(signum)`; the previous handlers come back on exit."""

    def __init__(self, on_signal: Callable[[int], None]):
        self.on_signal = on_signal
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.on_signal(signum)

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def raise_interrupted(signum: int) -> None:
    """The plain handling: stop here."""
    raise Interrupted(signum, f"interrupted by {name(signum)}")


class StopRequest(Signals):
    """Signals recorded while `deferring` (a stop at the next safe point: `check`), raised as Interrupted otherwise."""

    def __init__(self):
        super().__init__(self._record)
        self.signum: Optional[int] = None
        self.deferring = True

    def _record(self, signum: int) -> None:
        self.signum = signum
        if not self.deferring:
            raise_interrupted(signum)

    def check(self) -> None:
        """Interrupted if a signal came."""
        if self.signum is not None:
            raise_interrupted(self.signum)

    def stop_deferring(self) -> None:
        """From here on a signal stops at once (every write is atomic); one that came before stops now."""
        self.deferring = False
        self.check()
