"""One error style for every command: an expected problem is one line and exit status 2; a bug keeps its traceback.

Expected problems are bad input, bad config, a bad checkpoint, permissions and a full disk: code raises
`UserError` (or a subclass: DataError, EmbedError, CheckpointError, ...) with a message that names the
file or the config key and says what to do, and `run_command` turns it into

    <command>: error: <message>

on stderr and exit status 2. OSError (permissions, disk full, a path through a regular file) is
reported the same way, naming the file. SIGTERM (what SLURM preemption, `timeout` and schedulers send)
and SIGINT unwind the command like an exception, so every `finally` runs and temporary files are
removed; the command then prints one line and exits with 128 + the signal number (143, 130).
"""
from __future__ import annotations

import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

__all__ = ["UserError", "Interrupted", "USER_ERROR_STATUS", "run_command", "signals_unwind", "describe_os_error"]

T = TypeVar("T")
USER_ERROR_STATUS = 2


class UserError(Exception):
    """An expected problem: the message names the file or config key and what to do (no traceback shown)."""


class Interrupted(BaseException):
    """Raised in the main thread when SIGTERM arrives (SIGINT raises KeyboardInterrupt, as usual).

    A BaseException, like KeyboardInterrupt, so `except Exception` in libraries does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals received while `signals_unwind` is active (the first decides the status)


def _raise_interrupted(signum: int, frame: object) -> None:
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted and SIGINT KeyboardInterrupt in the main thread.

    Without it SIGTERM ends Python at once, skipping every `finally`: temporary files stay behind.
    (Lightning, during fit, chains its own SIGTERM notifier before this handler.)
    """
    _received.clear()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def _fail(command: str, message: str, status: int = USER_ERROR_STATUS) -> NoReturn:
    line = " ".join(message.split())  # one line, whatever the message's layout
    print(f"{command}: error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_command(command: str, body: Callable[[], T], interrupted_note: str = "") -> T:
    """body() with the command-line error style (see the module docstring); its value on success.

    interrupted_note: what a user should know after SIGTERM/SIGINT (e.g. how to resume), appended to
        the one-line message.
    """
    with signals_unwind():
        try:
            return body()
        except UserError as error:
            _fail(command, str(error))
        except OSError as error:
            _fail(command, describe_os_error(error))
        except (KeyboardInterrupt, Interrupted, SystemExit) as error:
            # Lightning answers KeyboardInterrupt with sys.exit(1): a signal we recorded explains it.
            if isinstance(error, SystemExit) and not _received:
                raise
            signum = _received[0] if _received else signal.SIGINT
            note = f"; {interrupted_note}" if interrupted_note else ""
            _fail(command, f"interrupted by {signal.Signals(signum).name}{note}", status=128 + signum)
