"""When asynchronous collectives complete, for the stage timer's ``comm`` rows.

A collective's completion callback is chained on its future (``work.get_future().then``);
work handles without a future (gloo's list-form ``reduce_scatter``) are waited on, in issue
order, by a :class:`CompletionWatcher` thread instead.  The timer keeps a :data:`Pending`
entry per collective until its callback has run.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

Pending: TypeAlias = "tuple[Callable[[], bool], Callable[[], Any]]"
"""A collective in flight: has it completed?, and wait until its callback has run (which
returns ``False`` while the watcher has not got to it yet)."""

_Watched: TypeAlias = "tuple[Any, Callable[[], None], threading.Event]"
"""A work handle, the callback to run once it is done, and the event then set."""


class CompletionWatcher:
    """For work handles without a future: a thread that waits on each, in issue order, and
    runs its callback.  Collectives of one process group complete in issue order, so the
    time seen for each is its completion time."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Watched | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kfacperf-comm-watch",
                                        daemon=True)
        self._thread.start()

    def watch(self, work: Any, callback: Callable[[], None]) -> threading.Event:
        finished = threading.Event()
        self._queue.put((work, callback, finished))
        return finished

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, callback, finished = item
            try:
                work.wait()
                callback()
            except Exception:  # a failed collective: the run reports it, not the timer
                pass
            finally:
                finished.set()
                # let go of the work (and its tensors) before blocking on the next one
                del item, work, callback, finished


def on_completion(work: Any, done: Callable[..., None],
                  watcher: Callable[[], CompletionWatcher]) -> Pending:
    """Have ``done`` run once ``work`` completes (with the future as its argument, or with
    none from the watcher); ``watcher`` gives the watcher, started on first need."""
    try:
        fut = work.get_future()
    except RuntimeError:  # e.g. gloo's list-form reduce_scatter has no future
        fut = None
    if fut is not None:
        chained = fut.then(done)
        return (fut.done, chained.wait)
    # done when the watcher has run the callback; not work.is_completed(), which gloo's
    # list-form reduce_scatter never sets: the entry (and through it the work and its
    # tensors, a whole factor payload per step) would then be kept for the whole run
    finished = watcher().watch(work, done)
    return (finished.is_set, lambda: finished.wait(1.0))


def still_pending(pending: list[Pending]) -> list[Pending]:
    """The entries left once the callbacks of finished collectives have run, without
    waiting for any collective that is still going."""
    still = []
    for is_done, wait in pending:
        finished = False
        if is_done():
            try:
                finished = wait() is not False  # False: watcher not there yet
            except Exception:
                finished = True
        if not finished:
            still.append((is_done, wait))
    return still


def wait_all(pending: Iterable[Pending]) -> None:
    """Wait for every entry's callback; a failed collective has no completion to record."""
    for _, wait in pending:
        try:
            wait()
        except Exception:
            pass
