"""The worker pool behind every long job: items in, results out in input order, crashes isolated.

Input: an iterator of picklable items and a function of one item (run in worker processes).
Output: the function's results, in input order. A worker that dies (a segfault in the MIDI
parser, the OOM killer) costs only the item it was running: the chunk it held is redone one
item at a time and the culprit becomes `on_crash(item)`. Workers die with their parent: on Linux
each asks the kernel for SIGKILL when the parent exits (`PR_SET_PDEATHSIG`), elsewhere a thread
polls the parent's pid, so a SIGKILLed or SIGTERMed run leaves no worker holding its pipes.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 0.5
_state: dict[str, Any] = {}


def _die_with_parent(parent_pid: int) -> None:
    """Make this process exit when `parent_pid` does (kernel signal on Linux, a polling thread elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)  # the running process's symbols, libc's prctl among them
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the request was made
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="midiva-parent-watch", daemon=True).start()


def _init_worker(parent_pid: int, fn: Callable[[Any], Any]) -> None:
    _die_with_parent(parent_pid)
    # The parent handles Ctrl-C (it shuts the pool down) and Slurm's SIGTERM/SIGUSR1, which reach every
    # process of a job (it commits and stops): a worker must not die of them mid-item. It still dies
    # with its parent, however that one ends.
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)
    _state["fn"] = fn


def _run_chunk(items: list[Any]) -> list[Any]:
    fn = _state["fn"]
    many = getattr(fn, "many", None)  # a function that does a whole chunk at once (e.g. batched features)
    return list(many(items)) if many is not None else [fn(item) for item in items]


def _discard(pool: ProcessPoolExecutor) -> None:
    """Drop a broken pool: cancel its work and SIGKILL its remaining workers.

    The executor's own clean-up of a broken pool sends SIGTERM, which workers ignore (Slurm sends it
    to every process of a job; only the main process decides how to stop), and would then wait for
    them forever.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()


def _broken() -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(BrokenProcessPool("the pool broke before the chunk was submitted"))
    return future


def map_in_order(
    fn: Callable[[T], R],
    items: Iterator[T],
    num_workers: int,
    on_crash: Callable[[T], R],
    *,
    chunk_size: int = 8,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """`map(fn, items)` over `num_workers` processes, in order, with a bounded number of items in flight.

    Args:
        fn: picklable function of one item; it should return its failures rather than raise them. When it
            has a `many(items)` method, a worker calls that once per chunk instead (e.g. batched features).
        items: the inputs, read lazily.
        num_workers: processes (0: run `fn` in this process).
        on_crash: the result for an item whose worker died while running it.
        chunk_size: items per task (amortises inter-process overhead).
        max_in_flight: chunks submitted ahead (default 4 per worker).
    """
    if num_workers == 0:
        yield from map(fn, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = _Pool(num_workers, multiprocessing.get_context(method), fn)
    pending: deque[tuple[list[T], Future[list[R]]]] = deque()
    limit = max_in_flight or 4 * num_workers
    source_error: Exception | None = None
    try:
        while True:
            while len(pending) < limit and source_error is None:
                chunk, source_error = take_chunk(items, chunk_size)
                if not chunk:
                    break
                pending.append((chunk, pool.submit(chunk)))
            if not pending:
                if source_error is not None:  # raised once every item read before it has its result
                    raise source_error
                return
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                results = pool.redo_alone(chunk, on_crash)
                pending = deque((c, pool.submit(c)) for c, _ in pending)
            yield from results
    finally:
        pool.close()


def take_chunk(items: Iterator[T], size: int) -> tuple[list[T], Exception | None]:
    """The next `size` items (fewer at the end), and the error the iterator raised while they were
    read, if any: items read before a broken source are still processed."""
    chunk: list[T] = []
    try:
        chunk.extend(islice(items, size))
    except Exception as err:
        return chunk, err
    return chunk, None


class _Pool:
    """A process pool that can be replaced when a worker dies."""

    def __init__(self, num_workers: int, context: Any, fn: Callable[[Any], Any]) -> None:
        self.num_workers, self.context, self.initargs = num_workers, context, (os.getpid(), fn)
        self.pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.num_workers, mp_context=self.context, initializer=_init_worker, initargs=self.initargs
        )

    def submit(self, chunk: list[Any]) -> Future[list[Any]]:
        """Run a chunk; a worker can die at any moment, so submitting can fail too: that chunk is redone like the others."""
        try:
            return self.pool.submit(_run_chunk, chunk)
        except BrokenProcessPool:
            return _broken()

    def replace(self) -> None:
        """Discard the broken pool and start a new one."""
        _discard(self.pool)
        self.pool = self._new()

    def redo_alone(self, chunk: list[Any], on_crash: Callable[[Any], Any]) -> list[Any]:
        """Every future of a broken pool fails: redo each item of `chunk` alone to find the culprit."""
        self.replace()
        results: list[Any] = []
        for item in chunk:
            try:
                results.extend(self.submit([item]).result())
            except BrokenProcessPool:
                log.warning("a worker process died; the item it held is recorded as crashed")
                self.replace()
                results.append(on_crash(item))
        return results

    def close(self) -> None:
        """Shut down (a broken pool's remaining workers are killed)."""
        if getattr(self.pool, "_broken", False):
            _discard(self.pool)
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)
