"""The errors of the data pipeline, in one place: each is a UserError (one line on the command line, exit 2).

DataError: bad input data or data configuration (a missing file, an empty split, a bad setting).
FastaFormatError: a file that is not FASTA (empty, binary, text before the first '>', truncated gzip).
Both are importable from `protein_performer.data` (and, as before, from `protein_performer.data.fasta`).
"""
from __future__ import annotations

from protein_performer.errors import UserError

__all__ = ["DataError", "FastaFormatError"]


class DataError(UserError):
    """Bad input data or configuration. The message names the file (and line) and what to do.

    Command-line entry points print it without a traceback and exit with status 2.
    """


class FastaFormatError(DataError):
    """A file that is not valid FASTA: empty, binary, text before the first '>', truncated gzip."""

