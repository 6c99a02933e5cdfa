"""One error style for every command: an expected problem is one line and exit status 2; a bug keeps its traceback.

Expected problems are bad input, bad config, a bad checkpoint, permissions and a full disk: code raises
`UserError` (or a subclass: DataError, EmbedError, CheckpointError, ...) with a message that names the
file or the config key and says what to do, and `run_command` turns it into

    <command>: error: <message>

on stderr and exit status 2. OSError (permissions, disk full, a path through a regular file) is
reported the same way, naming the file. SIGTERM (what SLURM preemption, `timeout` and schedulers send)
and SIGINT unwind the command like an exception, so every `finally` runs and temporary files are
removed; the command then prints one line and exits with 128 + the signal number (143, 130).

The signal handler only records the signal: an exception raised from a handler lands in whatever frame
runs at that moment, and in a weakref callback, `__del__` or finalizer Python prints "Exception
ignored" and carries on (a preprocess then ran to completion and exited 0). Long loops call
`raise_if_interrupted()` at safe points (between chunks, batches, steps), which raises Interrupted
(KeyboardInterrupt for SIGINT) there; `run_command` checks once more when its body returns, so a
signal that arrived after the last safe point still ends the command with its one line and status.
A second Ctrl-C raises at once, for code stuck where no safe point is reached.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

__all__ = ["UserError", "Interrupted", "USER_ERROR_STATUS", "run_command", "signals_unwind", "describe_os_error",
           "raise_if_interrupted", "received_signal", "record_signal", "records_signals"]

T = TypeVar("T")
USER_ERROR_STATUS = 2


class UserError(Exception):
    """An expected problem: the message names the file or config key and what to do (no traceback shown)."""


class Interrupted(BaseException):
    """Raised in the main thread when SIGTERM arrives (SIGINT raises KeyboardInterrupt, as usual).

    A BaseException, like KeyboardInterrupt, so `except Exception` in libraries does not swallow it.
    """

    def __init__(self, signum: int, note: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.note = note  # what happened instead of the command's usual note (e.g. a SLURM requeue)


_received: list[int] = []  # signals received while `signals_unwind` is active (the first decides the status)


_owner: list[int] = []  # the pid that installed the handler (a forked child inherits it, and must not keep it)


def _record_signal(signum: int, frame: object) -> None:
    """The handler: record the signal for the next safe point; raise nothing (see the module docstring)."""
    if _owner and os.getpid() != _owner[0]:  # a forked child (a DataLoader worker): the signal's default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    if signum == signal.SIGINT and _received.count(signal.SIGINT) > 1:
        raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for a safe point


def record_signal(signum: int) -> None:
    """Record `signum` as received (for a signal that code handled itself, e.g. a SLURM requeue signal)."""
    _received.append(signum)


def received_signal() -> int | None:
    """The first SIGTERM/SIGINT received within `signals_unwind`, or None."""
    return _received[0] if _received else None


def raise_if_interrupted() -> None:
    """A safe point: raise Interrupted (KeyboardInterrupt for SIGINT) if a signal has been received."""
    if not _received:
        return
    if _received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(_received[0])


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT are recorded, and raised at the next `raise_if_interrupted()`.

    Without it SIGTERM ends Python at once, skipping every `finally`: temporary files stay behind.
    (Lightning, during fit, chains its own SIGTERM notifier before this handler and raises its
    SIGTERMException at its own safe points.) Nested blocks share the outer block's record.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    if signal.getsignal(signal.SIGTERM) is _record_signal:  # nested: the outer block owns the handlers
        yield
        return
    _received.clear()
    _owner[:] = [os.getpid()]
    previous = {signum: signal.signal(signum, _record_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # handled: safe points outside the block (a later run in this process) see nothing


def records_signals(command: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a command's entry point (outside @hydra.main) so that SIGTERM and SIGINT are recorded from
    its first moment, while Hydra composes the config and sets up the run directory, not only once
    `run_command` runs; a signal that arrives after `run_command` has returned still ends the command
    with its one line and status."""
    def decorate(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def wrapper(*args: object, **kwargs: object) -> T:
            with signals_unwind():
                result = main(*args, **kwargs)
                if _received:
                    _fail_interrupted(command, "")
                return result
        return wrapper
    return decorate


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: 'file: reason' when it names a file (h5py's messages name it inside)."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        target = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        return f"{target}: {reason}"
    return reason


def make_output_directory(output: Path, error: type[UserError]) -> None:
    """Create `output`'s parent directory if needed and check that files can be created in it; `error`
    (one line naming the directory) when either cannot be done, before any work starts."""
    if output.parent.exists() and not output.parent.is_dir():
        raise error(f"{output.parent}: is a file, not a directory; choose another output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as failure:
        raise error(f"cannot create the output directory: {describe_os_error(failure)}") from None
    try:  # really create a file: permission bits alone say nothing for root or on a read-only mount
        with tempfile.TemporaryFile(dir=output.parent):
            pass
    except OSError as failure:
        reason = failure.strerror or type(failure).__name__
        raise error(f"{output.parent}: cannot write in this directory ({reason}); choose another output") from None


def _close_progress_bars() -> None:
    """Close the progress bars still open (Lightning's, tqdm's), so that their final lines come out now,
    before the error line, and not after it when they are collected at exit."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone: nothing to print
            pass
    sys.stdout.flush()


def _fail(command: str, message: str, status: int = USER_ERROR_STATUS) -> NoReturn:
    line = " ".join(message.split())  # one line, whatever the message's layout
    _close_progress_bars()  # the error line is the last thing the user sees
    print(f"{command}: error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_command(command: str, body: Callable[[], T], interrupted_note: str | Callable[[], str] = "") -> T:
    """body() with the command-line error style (see the module docstring); its value on success.

    interrupted_note: what a user should know after SIGTERM/SIGINT (e.g. how to resume), appended to
        the one-line message; a callable is asked when the signal has been handled.
    """
    with signals_unwind():
        try:
            result = body()
            raise_if_interrupted()  # a signal after the last safe point still ends the command as one
            return result
        except UserError as error:
            _fail_unless_interrupted(command, str(error), interrupted_note)
        except OSError as error:
            _fail_unless_interrupted(command, describe_os_error(error), interrupted_note)
        except (KeyboardInterrupt, Interrupted, SystemExit) as error:
            # Lightning answers KeyboardInterrupt with sys.exit(1) and SIGTERM with its SIGTERMException (a
            # SystemExit): a signal we recorded explains it.
            if isinstance(error, SystemExit) and not _received:
                raise
            _fail_interrupted(command, error.note if isinstance(error, Interrupted) and error.note else interrupted_note)


def _fail_unless_interrupted(command: str, message: str, note: str | Callable[[], str]) -> NoReturn:
    """An error met while unwinding from a signal (a file the unwinding closed, ...) is the signal's doing."""
    if _received:
        _fail_interrupted(command, note)
    _fail(command, message)


def _fail_interrupted(command: str, note: str | Callable[[], str]) -> NoReturn:
    signum = _received[0] if _received else signal.SIGINT
    text = note() if callable(note) else note
    _fail(command, f"interrupted by {signal.Signals(signum).name}" + (f"; {text}" if text else ""),
          status=128 + signum)
