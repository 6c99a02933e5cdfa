"""An ordered process pool for preprocessing: tasks in, results out in task order, memory bounded.

    for result in map_in_processes(function, tasks, workers=4):
        ...

Task i goes to worker i mod `workers` and results are taken back in the same rotation, so results
come out in task order with no reordering buffer, and at most `workers * depth` tasks are in flight
(memory is bounded by queue depth, never by input size). Workers are forked (they need nothing but
what the parent already imported, and never touch its HDF5 or tqdm state) and die with their parent
however it ends (SIGKILL and the OOM killer included: `_die_with_parent`). Tasks go out and results
come back through two pipes per worker as pickle protocol 5 with the arrays' data and large bytes (blocks
of FASTA) out of band, each message read straight into a buffer of its size: the data are neither copied
into a pickle nor through the BytesIO that multiprocessing's `recv_bytes` grows (`_send_all`,
`_receive`); a thread on each side sends, so neither waits on the other's full pipe. A DataError
raised in a worker is raised again in the parent as it is (one line naming the file and line); any
other exception is a bug and arrives with the worker's traceback.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from protein_performer.data.errors import DataError

__all__ = ["map_in_processes", "default_workers", "JoinedBytes"]

Task = TypeVar("Task")
Result = TypeVar("Result")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_SECONDS = 0.5


def _die_with_parent(parent: int) -> None:
    """Make this (forked) process end when `parent` does, however it ends (SIGKILL and OOM kills included).

    Signals first: the forked child inherited the parent's Python handlers (which would turn the
    parent's terminate() into an exception here); SIGTERM gets its default action back and SIGINT
    (Ctrl-C reaches the whole process group) is left to the parent, which stops this process itself.
    Then Linux's PR_SET_PDEATHSIG delivers SIGKILL when the parent dies (strictly: when the thread
    that forked it ends, which is the thread consuming the chunks); a thread polling the parent's pid
    covers other systems and the moment before prctl took effect.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by the parent across the fork (_start_unsignalled)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_BLOCKED)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the poll below still ends this process

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before prctl was set
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_START_BLOCKED = {signal.SIGTERM, signal.SIGINT}


def _start_unsignalled(process: Any) -> None:
    """`process.start()` with SIGTERM and SIGINT blocked in this thread, so the child is born with them
    blocked (the mask is inherited) until `_die_with_parent` has replaced the parent's handlers.
    Otherwise a SIGTERM in the window between fork and that point runs the parent's handler inside the
    child's at-fork hooks (an "Exception ignored" traceback on the shared stderr). Signals that arrive
    meanwhile stay pending here and are handled once the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        process.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _START_BLOCKED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
_KEEP_FREED_BYTES = 1 << 30
_MMAP_FROM_BYTES = 32 << 20  # glibc's largest allowed threshold


def _reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next task instead of handing it back to the kernel.

    Each task allocates and frees several buffers of megabytes. By default glibc maps such buffers
    afresh or trims them off the heap when freed, so every task pays for page faults and for the
    kernel zeroing the pages again (about a tenth of a worker's CPU). A worker's footprint is its
    largest task anyway, and it ends with the build. Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)
    except (OSError, AttributeError):
        pass


def _worker_main(function: Callable[[Any], Any], tasks: Any, results: Any, parent: int) -> None:
    """Compute tasks until None arrives; a thread sends the results, so the next task starts meanwhile."""
    _die_with_parent(parent)
    _reuse_freed_memory()
    outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
    sender = threading.Thread(target=_send_all, args=(outgoing, results), name="send-results", daemon=True)
    sender.start()
    try:
        while (task := _receive(tasks)) is not None:
            outgoing.put(("ok", function(task)))
    except DataError as error:
        outgoing.put(("error", error))
    except BaseException:  # a bug: the parent shows its traceback
        outgoing.put(("crash", traceback.format_exc()))
    finally:
        outgoing.put(_END)
        sender.join()  # everything put has reached the pipe before this process ends


_END = object()  # what ends _send_all
_OUT_OF_BAND_BYTES = 1 << 16  # bytes objects this large travel beside the pickle, not inside it


class _OutOfBand:
    """A large bytes object, pickled beside the pickle (the pickler never asks how to reduce plain bytes)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return bytes, (pickle.PickleBuffer(self.data),)


class JoinedBytes:
    """Buffers (bytes, memoryviews) that arrive in a worker as one bytes object: each is sent out of band
    from where it lies and they are joined once on arrival, so the parent hands over a block it holds in
    pieces without joining (copying) it first."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: Iterable[Any]) -> None:
        self.pieces = tuple(pieces)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _joined, tuple(pickle.PickleBuffer(piece) for piece in self.pieces)


def _joined(*buffers: Any) -> bytes:
    return b"".join(buffers)


def _large_bytes_out_of_band(item: Any) -> Any:
    """`item`, with itself or its elements (a plain tuple's: a task of a block) wrapped in _OutOfBand
    where they are bytes of at least _OUT_OF_BAND_BYTES: they arrive as bytes, copied once."""
    def wrap(value: Any) -> Any:
        return _OutOfBand(value) if type(value) is bytes and len(value) >= _OUT_OF_BAND_BYTES else value

    return tuple(map(wrap, item)) if type(item) is tuple else wrap(item)


def _send_all(outgoing: queue.SimpleQueue[Any], connection: Any) -> None:
    """Send each item until _END as pickle protocol 5: one message with the buffer count and the
    pickle, then one message per out-of-band buffer (numpy arrays' data and large bytes, sent from where
    they lie, never copied into the pickle). The parent sends tasks this way, the workers results.
    A reader that is gone ends the sending (the parent notices a dead worker by itself)."""
    try:
        while (item := outgoing.get()) is not _END:
            buffers: list[pickle.PickleBuffer] = []
            data = pickle.dumps(_large_bytes_out_of_band(item), protocol=5, buffer_callback=buffers.append)
            connection.send_bytes(struct.pack("!Q", len(buffers)) + data)
            for buffer in buffers:
                connection.send_bytes(buffer.raw())
    except OSError:  # BrokenPipeError: the other end is gone
        pass


def _receive(connection: Any) -> Any:
    """One result sent by `_send_all`, each message read straight into a buffer of its size."""
    fd = connection.fileno()
    head = _read_message(fd)
    (count,) = struct.unpack_from("!Q", head)
    buffers = [_read_message(fd) for _ in range(count)]
    return pickle.loads(memoryview(head)[8:], buffers=buffers)


def _read_message(fd: int) -> bytearray:
    """One message of Connection.send_bytes: its frame is a "!i" size, or -1 and a "!Q" size."""
    (size,) = struct.unpack("!i", _read_exactly(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exactly(fd, 8))
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> bytearray:
    """`size` bytes from `fd`, read into one buffer (EOFError if the writer ends first)."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if not n:
            raise EOFError
        got += n
    return buffer


_PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged process (/proc/sys/fs/pipe-max-size)


def _widen(connection: Any) -> None:
    """Give a pipe a 1 MiB buffer instead of 64 KiB: a block or a result of megabytes then crosses in a
    few system calls and context switches, not dozens. Where that is not possible, the pipe stays as it is."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


def map_in_processes(function: Callable[[Task], Result], tasks: Iterable[Task], workers: int,
                     depth: int = 2) -> Iterator[Result]:
    """function(task) for every task, computed in `workers` child processes, yielded in task order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    inboxes = [context.Pipe(duplex=False) for _ in range(workers)]  # (worker's reader, parent's writer)
    pipes = [context.Pipe(duplex=False) for _ in range(workers)]  # (parent's reader, worker's writer)
    for reader, _ in [*inboxes, *pipes]:
        _widen(reader)
    outboxes = [reader for reader, _ in pipes]
    processes = [context.Process(target=_worker_main, args=(function, inbox, writer, os.getpid()),
                                 name=f"preprocess-{k}", daemon=True)
                 for k, ((inbox, _), (_, writer)) in enumerate(zip(inboxes, pipes))]
    with _signals_deferred():
        for process in processes:
            _start_unsignalled(process)
    for (reader, _), (_, writer) in zip(inboxes, pipes):
        reader.close()  # only the worker reads its tasks
        writer.close()  # and only the worker writes its results
    # A thread per worker sends its tasks, so taking results back never waits on a worker's full pipe.
    sending = [queue.SimpleQueue() for _ in range(workers)]
    senders = [threading.Thread(target=_send_all, args=(tasks_k, writer), name=f"send-tasks-{k}", daemon=True)
               for k, (tasks_k, (_, writer)) in enumerate(zip(sending, inboxes))]
    for sender in senders:
        sender.start()
    in_flight: deque[int] = deque()  # the worker of each task sent and not yet taken back, in order

    def take() -> Result:
        k = in_flight.popleft()
        while not outboxes[k].poll(_POLL_SECONDS):
            if not processes[k].is_alive() and not outboxes[k].poll(0):
                processes[k].join(timeout=5)
                raise RuntimeError(f"preprocessing worker {k} died (exit code {processes[k].exitcode})")
        try:
            status, value = _receive(outboxes[k])
        except EOFError:
            raise RuntimeError(f"preprocessing worker {k} died while sending a result") from None
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
            sending[k].put(task)
            in_flight.append(k)
        while in_flight:
            yield take()
        for tasks_k in sending:
            tasks_k.put(None)  # the workers' signal to end
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():  # cannot happen with SIGTERM's default action; never hang on it
                process.kill()
                process.join()
        for tasks_k in sending:
            tasks_k.put(_END)
        for sender, (_, writer) in zip(senders, inboxes):
            sender.join(timeout=5)  # its reader is gone: a write ends at once with a broken pipe
            writer.close()
        for outbox in outboxes:
            outbox.close()
