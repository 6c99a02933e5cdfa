"""Messages of the libraries under a training run that alarm without helping, silenced where they arise.

Each is matched narrowly (its own text and source), so every other warning still reaches the user:
- Lightning's pytree helper trips torch's FutureWarning about `isinstance(treespec, LeafSpec)` 2-3 times
  a run (Lightning's code, nothing a user can change);
- Lightning advertises a cloud logger ("Tip: ... litlogger") whenever none is configured;
- wandb warns that "the anonymous setting has no effect": `training.loggers.WandbLogger` no longer
  passes the setting (see there), so this one is fixed at its source rather than filtered.
"""
from __future__ import annotations

import logging
import warnings

__all__ = ["silence_unhelpful_messages"]

_LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def silence_unhelpful_messages() -> None:
    """Install the filters (idempotent): call once per process before building the Trainer."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _not_an_advert not in logger.filters:
            logger.addFilter(_not_an_advert)
