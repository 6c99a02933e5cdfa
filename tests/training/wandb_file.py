"""Read back what a run logged to an offline wandb file, to check the wandb logging itself.

wandb offers no public reader for offline runs (`wandb sync` uploads them), so this test helper parses
the file with wandb's own protobuf messages: a .wandb file is a LevelDB-style log, a 7-byte header
(":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type:
full | first | middle | last); a block's tail shorter than a chunk header is zero padding. Each
reassembled record is a wandb `Record`. The package itself reads metrics.csv (plot_runs).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_IDENT = b":W&B"
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a .wandb file, in order."""
    data = path.read_bytes()
    assert data.startswith(_IDENT), f"{path} is not a wandb run file"
    position, pending = 7, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            position += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        position += _CHUNK_HEADER.size
        chunk = data[position:position + length]
        position += length
        if kind in (_FIRST, _MIDDLE):
            pending = (pending if kind == _MIDDLE else b"") + chunk
            continue
        if kind not in (_FULL, _LAST):  # zeros: the writer stopped mid-block
            return
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk if kind == _LAST else chunk)
        yield record


@dataclass
class LoggedRun:
    group: str | None = None
    config: dict = field(default_factory=dict)  # the `config` entry train.py logged
    history: list[dict] = field(default_factory=list)  # one dict per logged row


def read_run(path: Path) -> LoggedRun:
    run = LoggedRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group = record.run.run_group or None
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({("/".join(item.nested_key) if item.nested_key else item.key): json.loads(item.value_json)
                                for item in record.history.item})
    return run
