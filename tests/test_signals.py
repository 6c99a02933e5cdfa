"""SIGTERM and SIGINT in the error style: recorded by the handler, raised at safe points, never swallowed."""
from __future__ import annotations

import gc
import os
import signal
import time
import weakref

import pytest
from tqdm import tqdm

from protein_performer.errors import raise_if_interrupted, run_command, signals_unwind


class Resource:
    pass


def test_sigterm_during_a_finalizer_is_not_swallowed(capsys):
    """A SIGTERM whose handler ran inside a weakref callback used to raise there ("Exception ignored"),
    and the command ran on to exit 0 with its output written."""
    written = []

    def body() -> str:
        resource = Resource()
        weakref.finalize(resource, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))
        del resource
        gc.collect()
        written.append("output")
        return "done"

    with pytest.raises(SystemExit) as stopped:
        run_command("preprocess", body, interrupted_note="nothing was written")
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Exception ignored" not in err
    assert err.strip().splitlines()[-1] == "preprocess: error: interrupted by SIGTERM; nothing was written"


def test_the_handler_records_and_the_safe_point_raises():
    steps = []

    def body() -> None:
        for step in range(5):
            raise_if_interrupted()
            steps.append(step)
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here and must not raise
                steps.append("after")

    with pytest.raises(SystemExit) as stopped:
        run_command("train", body)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert steps == [0, 1, 2, "after"]


def test_ctrl_c_twice_raises_at_once():
    with signals_unwind():
        os.kill(os.getpid(), signal.SIGINT)  # recorded
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_a_forked_child_dies_of_sigterm_as_by_default():
    with signals_unwind():
        pid = os.fork()
        if pid == 0:  # the child inherited the recording handler
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM


def test_the_error_line_comes_after_the_progress_bar_s_last_line(capsys):
    """An open bar used to print its final line when collected at exit, after the error line."""
    def body() -> None:
        bar = tqdm(total=10, desc="Epoch 0", file=os.sys.stderr, leave=True)
        bar.update(3)
        body.bar = bar  # still open when the command fails, as Lightning's is
        os.kill(os.getpid(), signal.SIGINT)
        raise_if_interrupted()

    with pytest.raises(SystemExit) as stopped:
        run_command("train", body, interrupted_note="resume with ckpt_path=...")
    body.bar.close()  # what exit would do
    assert stopped.value.code == 128 + signal.SIGINT
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert lines[-1] == "train: error: interrupted by SIGINT; resume with ckpt_path=..."
    assert any("Epoch 0" in line for line in lines[:-1])
