"""FeatureRedraw's schedule at the edges: never after the last optimizer step of a run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from protein_performer.model import PerformerConfig, ProteinPerformer
from protein_performer.training import FeatureRedraw


def _run_steps(callback: FeatureRedraw, steps: range, **trainer: object) -> list[int]:
    model = ProteinPerformer(PerformerConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                             attention="favor", nb_features=8, feature_redraw_interval=4))
    module = SimpleNamespace(model=model)
    state = SimpleNamespace(**{"max_steps": -1, "max_epochs": None, "current_epoch": 0, "is_last_batch": False,
                               **trainer})
    for step in steps:
        state.global_step = step
        callback.on_train_batch_end(state, module, None, None, step)
    return callback.redraw_steps


def test_redraws_every_interval_but_not_after_the_last_step():
    assert _run_steps(FeatureRedraw(), range(1, 13), max_steps=12) == [4, 8]
    assert _run_steps(FeatureRedraw(), range(1, 14), max_steps=13) == [4, 8, 12]
    assert _run_steps(FeatureRedraw(), range(1, 13)) == [4, 8, 12]  # no known end: the schedule as is


@pytest.mark.parametrize(("epoch", "redrawn"), [(0, [4, 8, 12]), (1, [4, 8])], ids=["earlier-epoch", "last-epoch"])
def test_no_redraw_on_the_last_batch_of_the_last_epoch(epoch, redrawn):
    callback = FeatureRedraw()
    _run_steps(callback, range(1, 12), max_epochs=2, current_epoch=epoch)
    assert _run_steps(callback, range(12, 13), max_epochs=2, current_epoch=epoch, is_last_batch=True) == redrawn
