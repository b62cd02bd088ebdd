"""The training log (``log.jsonl``: one JSON record per step), read tolerantly.

A process killed while appending leaves a cut-off last line; that line is dropped with a warning (the step it
described is redone on --resume). An unreadable line before the last is corruption: ValueError naming the file
and line.
"""
from __future__ import annotations

import json
import warnings


def read_log(path: str) -> list[dict]:
    """The records of ``path`` in order, without a truncated last line."""
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a truncated last line ({number})", stacklevel=2)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        records.append(record)
    return records
