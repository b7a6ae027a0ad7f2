"""SIGTERM stops a run like Ctrl-C (the finished cases are summarised), and the stop is reported as SIGTERM
(exit 143) even when a library turns the raised exception into a plain KeyboardInterrupt, as Ray's
`ray.get` does when the signal arrives while it waits."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_received: list[str] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same cleanup runs; exit 143."""

    signal_name = "SIGTERM"


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM (a CI timeout, `kill`) raises Terminated; a second one is ignored, so that it
    cannot cut the summary short."""
    _received.clear()
    signal.signal(signal.SIGTERM, lambda signum, frame: _terminate())


def _terminate() -> NoReturn:
    """Records the SIGTERM, ignores any later one, and raises Terminated."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append("SIGTERM")
    raise Terminated


def raise_if_stopped() -> None:
    """Raises Terminated when a SIGTERM was received but its exception never arrived: Python swallows an
    exception raised while a `__del__` method runs (it prints "Exception ignored in ..."). The run loops
    call this between batches."""
    if _received:
        raise Terminated


def signal_name(exc: KeyboardInterrupt) -> str:
    """Which signal stopped the run: the exception's own, else SIGTERM once one was received, else SIGINT."""
    return getattr(exc, "signal_name", None) or (_received[-1] if _received else "SIGINT")


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has ended, then stop the program as they would have, so
    that a stop arriving while a run writes its summary and final state cannot leave them unwritten. A
    signal that was being ignored stays ignored. Outside the main thread (where Python cannot set
    handlers) the block runs unshielded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda received, frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    live = [signum for signum in pending if previous[signum] != signal.SIG_IGN]
    if live and live[0] == signal.SIGTERM:
        _terminate()
    if live:
        raise KeyboardInterrupt
