"""An append-only JSON-lines metrics log that can be cut back on resume.

Each line is one JSON object with at least ``"step"``. After a run resumes
from the checkpoint of step ``s``, :meth:`MetricsLog.truncate` drops every
entry beyond ``s`` (and any partial last line left by a killed process), so
no step is logged twice.

Example:
  >>> import tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
  >>> log = MetricsLog(path)
  >>> for s in (10, 20, 30):
  ...   log.write({"step": s, "split": "train", "loss_after": 1.0 / s})
  >>> log.truncate(20)
  >>> [r["step"] for r in read_records(path)]
  [10, 20]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imaml_jax.train import checkpoint as ckpt_lib


def read_records(path: str | os.PathLike) -> list[dict]:
  """The parseable records of a JSON-lines file (``[]`` if it is missing)."""
  path = Path(path)
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
  return records


class MetricsLog:
  """Appends records to ``path``, one JSON object per line."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._file = None

  def truncate(self, step: int) -> None:
    """Keeps only the records with ``record["step"] <= step``."""
    self.close()
    if not self.path.exists():
      return
    kept = [r for r in read_records(self.path) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    ckpt_lib.write_atomic(self.path, text.encode())

  def write(self, record: dict) -> None:
    """Appends ``record`` and flushes it to the operating system."""
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def flush(self) -> None:
    """Hands the written records to the operating system."""
    if self._file is not None:
      self._file.flush()

  def sync(self) -> None:
    """Flushes, then waits until the records are on disk (``fsync``).

    Called before each checkpoint, so that a checkpoint that survives a
    power loss finds every record up to its step in the log.
    """
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
