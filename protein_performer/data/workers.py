"""An ordered process pool for preprocessing: tasks in, results out in task order, memory bounded.

    for result in map_in_processes(function, tasks, workers=4):
        ...

Task i goes to worker i mod `workers` and results are taken back in the same rotation, so results
come out in task order with no reordering buffer, and at most `workers * depth` tasks are in flight
(memory is bounded by queue depth, never by input size). Workers are forked (they need nothing but
what the parent already imported, and never touch its HDF5 or tqdm state) and die with their parent
however it ends (SIGKILL and the OOM killer included: `fasta_chunks._die_with_parent`). A DataError
raised in a worker is raised again in the parent as it is (one line naming the file and line); any
other exception is a bug and arrives with the worker's traceback.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from protein_performer.data.errors import DataError
from protein_performer.data.fasta_chunks import _die_with_parent, _start_unsignalled

__all__ = ["map_in_processes", "default_workers"]

Task = TypeVar("Task")
Result = TypeVar("Result")

_MAX_DEFAULT_WORKERS = 8  # beyond this the parent (inflating, writing HDF5) is the bottleneck anyway
_POLL_SECONDS = 0.5


def default_workers() -> int:
    """min(the CPU cores this process may use, 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, _MAX_DEFAULT_WORKERS))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT's Python handlers back while workers are forked, then deliver them.

    A handler that raises (as the commands' do: `errors.signals_unwind`) may otherwise run inside
    fork's at-fork hooks, where Python prints the exception and drops it: the build would go on
    and end with status 0 although it was told to stop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _worker_main(function: Callable[[Any], Any], tasks: Any, results: Any, parent: int) -> None:
    _die_with_parent(parent)
    try:
        while (task := tasks.get()) is not None:
            results.put(("ok", function(task)))
    except DataError as error:
        results.put(("error", error))
    except BaseException:  # a bug: the parent shows its traceback
        results.put(("crash", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # everything put has reached the pipe before this process ends


def map_in_processes(function: Callable[[Task], Result], tasks: Iterable[Task], workers: int,
                     depth: int = 2) -> Iterator[Result]:
    """function(task) for every task, computed in `workers` child processes, yielded in task order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    inboxes = [context.Queue() for _ in range(workers)]
    outboxes = [context.Queue() for _ in range(workers)]
    processes = [context.Process(target=_worker_main, args=(function, inbox, outbox, os.getpid()),
                                 name=f"preprocess-{k}", daemon=True)
                 for k, (inbox, outbox) in enumerate(zip(inboxes, outboxes))]
    with _signals_deferred():
        for process in processes:
            _start_unsignalled(process)
    in_flight: deque[int] = deque()  # the worker of each task sent and not yet taken back, in order

    def take() -> Result:
        k = in_flight.popleft()
        while True:
            try:
                status, value = outboxes[k].get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not processes[k].is_alive():
                    raise RuntimeError(f"preprocessing worker {k} died (exit code {processes[k].exitcode})") from None
        if status == "ok":
            return value
        if status == "error":
            raise value
        raise RuntimeError(f"preprocessing worker {k} failed:\n{value}")

    try:
        for number, task in enumerate(tasks):
            if len(in_flight) >= workers * depth:
                yield take()
            k = number % workers
            inboxes[k].put(task)
            in_flight.append(k)
        while in_flight:
            yield take()
        for inbox in inboxes:
            inbox.put(None)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():  # cannot happen with SIGTERM's default action; never hang on it
                process.kill()
                process.join()
        for box in (*inboxes, *outboxes):
            box.cancel_join_thread()  # a feeder thread must not block this process on a dead reader
            box.close()
