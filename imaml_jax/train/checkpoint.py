"""Atomic, checksummed checkpoints in a small self-describing file format.

A checkpoint file ``checkpoint_<step>.ckpt`` is one JSON header line followed
by a payload::

  {"format": "imaml_jax.checkpoint", "version": 1, "step": 1000,
   "size": 123456, "sha256": "..."}\\n
  <payload: msgpack of a nested dict of numpy arrays (flax.serialization)>

The payload holds the pytrees given to :func:`save` (e.g. the meta-state, the
best-validation parameters, the random key, the config) as plain nested dicts
(``flax.serialization.to_state_dict``), so restoring needs a template of the
same structure (:func:`restore_into`), which also checks every array's shape
and dtype.

Writes are atomic: the bytes go to a temporary file in the same directory,
which is flushed, ``fsync``-ed and renamed over the final name with
``os.replace`` (then the directory is ``fsync``-ed). A process killed at any
moment leaves either the previous set of checkpoints or the new one, plus at
most a stray temporary file that is never read. A truncated or altered file
fails the size or SHA-256 check with :class:`CheckpointError`.

The library uses this format rather than Orbax because its checkpoints are
single files written by process 0 alone to a shared file system, where an
atomic rename and a checksum are all the safety needed, without another
dependency or a checkpoint directory layout.

Example:
  >>> import tempfile, numpy as np
  >>> d = tempfile.mkdtemp()
  >>> path = save(d, 7, {"w": np.arange(3.0)})
  >>> step, tree = load(path)
  >>> step, tree["w"]
  (7, array([0., 1., 2.]))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

FORMAT = "imaml_jax.checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint_(\d+)\.ckpt$")
_TMP_PREFIX = ".tmp-checkpoint_"


class CheckpointError(ValueError):
  """A checkpoint is corrupt, truncated or does not fit the run."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
  """``directory/checkpoint_<step, 9 digits>.ckpt``."""
  return Path(directory) / f"checkpoint_{step:09d}.ckpt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
  """``[(step, path), ...]`` of the checkpoint files, oldest first."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  found = []
  for entry in directory.iterdir():
    match = _NAME.match(entry.name)
    if match and entry.is_file():
      found.append((int(match.group(1)), entry))
  return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
  """The checkpoint with the highest step, or ``None``."""
  found = list_checkpoints(directory)
  return found[-1][1] if found else None


def temporary_prefix(path: str | os.PathLike) -> str:
  """The name prefix of :func:`write_atomic`'s temporary files for ``path``.

  Example:
    >>> temporary_prefix("runs/x/metrics.jsonl")
    '.tmp-metrics.jsonl.'
  """
  return f".tmp-{Path(path).name}."


def remove_stale_temporaries(
  directory: str | os.PathLike, names: tuple[str, ...] | None = None
) -> list[Path]:
  """Deletes temporary files a killed process left in ``directory``.

  Only a process that alone writes the files concerned may call this (the
  trainer holding its run's lock): another writer's temporary file would be
  deleted before its rename.

  Args:
    directory: the directory to clean.
    names: the files whose temporaries are removed (``None``: checkpoints,
      those of an interrupted :func:`save`).

  Returns:
    The removed paths.
  """
  directory = Path(directory)
  if names is None:
    prefixes = (_TMP_PREFIX,)
  else:
    prefixes = tuple(temporary_prefix(name) for name in names)
  removed = []
  if directory.is_dir():
    for entry in directory.iterdir():
      if entry.name.startswith(prefixes) and entry.is_file():
        entry.unlink(missing_ok=True)
        removed.append(entry)
  return removed


def _to_numpy(tree: Any) -> Any:
  state = flax.serialization.to_state_dict(tree)
  return jax.tree.map(
    lambda x: x if isinstance(x, str) else np.asarray(x), state
  )


def _fsync_dir(directory: Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a synced temporary file and a rename."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
  try:
    # mkstemp creates the file private (0600); give it the permissions an
    # ordinary new file would get under the process's umask.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def save(
  directory: str | os.PathLike, step: int, tree: Any, *, keep: int | None = None
) -> Path:
  """Writes ``tree`` as checkpoint ``step`` atomically; keeps the newest ``keep``.

  Args:
    directory: the checkpoint directory (created if needed).
    step: the step number in the file name and header.
    tree: a pytree of arrays, Python scalars and strings (dicts, lists,
      tuples, named tuples and Flax structures).
    keep: if given, older checkpoints beyond the newest ``keep`` are deleted
      after the new one is in place.

  Returns:
    The path written.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  payload = flax.serialization.msgpack_serialize(_to_numpy(tree))
  header = {
    "format": FORMAT,
    "version": VERSION,
    "step": int(step),
    "size": len(payload),
    "sha256": hashlib.sha256(payload).hexdigest(),
  }
  path = checkpoint_path(directory, step)
  write_atomic(path, json.dumps(header).encode() + b"\n" + payload)
  if keep is not None:
    for _, old in list_checkpoints(directory)[:-keep]:
      if old != path:
        old.unlink(missing_ok=True)
  return path


def load(path: str | os.PathLike) -> tuple[int, Any]:
  """Reads and verifies a checkpoint.

  Returns:
    ``(step, tree)`` with ``tree`` the saved structure as nested dicts of
    numpy arrays (see :func:`restore_into`).

  Raises:
    CheckpointError: unreadable, not a checkpoint, truncated or corrupt.
  """
  path = Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
  head, sep, payload = raw.partition(b"\n")
  try:
    header = json.loads(head) if sep else None
  except ValueError:
    header = None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise CheckpointError(
      f"{path} is not an imaml_jax checkpoint (bad "
      "header); the file is corrupt or truncated."
    )
  if header.get("version") != VERSION:
    raise CheckpointError(
      f"{path} has checkpoint version "
      f"{header.get('version')}; this imaml_jax reads "
      f"version {VERSION}."
    )
  if len(payload) != header.get("size"):
    raise CheckpointError(
      f"{path} is truncated or corrupt: expected "
      f"{header.get('size')} payload bytes, found "
      f"{len(payload)}."
    )
  if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
    raise CheckpointError(f"{path} is corrupt: SHA-256 checksum mismatch.")
  try:
    tree = flax.serialization.msgpack_restore(payload)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: cannot decode payload: {e}") from e
  return int(header["step"]), tree


def check_intact(path: str | os.PathLike) -> tuple[int, Any]:
  """Verifies checkpoint ``path``; a failure names the way back.

  The error of :func:`load` gains the newest older checkpoint of the same
  directory that verifies, and what to do to use it (the corrupt file is
  the user's to move; nothing is deleted here).

  Returns:
    :func:`load`'s ``(step, tree)``, for a reader that must not read the
    file again (a running trainer may have replaced it since).

  Raises:
    CheckpointError: ``path`` does not verify.
  """
  path = Path(path)
  try:
    return load(path)
  except CheckpointError as e:
    older = [p for _, p in list_checkpoints(path.parent) if p != path]
    intact = next((p for p in reversed(older) if _verifies(p)), None)
    if intact is None:
      hint = " No older checkpoint in its directory verifies."
    else:
      hint = (
        f" The newest intact one is {intact.name}: move {path.name} out of "
        f"{path.parent} to resume or test from it."
      )
    raise CheckpointError(f"{e}{hint}") from e


def _verifies(path: Path) -> bool:
  try:
    load(path)
  except CheckpointError:
    return False
  return True


def restore_into(template: Any, restored: Any, *, what: str = "checkpoint"):
  """Fills ``template``'s structure with ``restored`` values, checking them.

  Args:
    template: a pytree with the expected structure, shapes and dtypes.
    restored: the matching part of a tree returned by :func:`load`.
    what: a name for error messages.

  Returns:
    A pytree like ``template`` holding the restored arrays.

  Raises:
    CheckpointError: different structure, shapes or dtypes.
  """
  want = jax.tree_util.tree_flatten_with_path(
    flax.serialization.to_state_dict(template)
  )[0]
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  want_keys = [jax.tree_util.keystr(p) for p, _ in want]
  got_keys = [jax.tree_util.keystr(p) for p, _ in got]
  if want_keys != got_keys:
    extra = sorted(set(got_keys) - set(want_keys))
    missing = sorted(set(want_keys) - set(got_keys))
    raise CheckpointError(
      f"{what} does not match this run's structure: "
      f"unexpected entries {extra}, missing {missing}."
    )
  for key, (_, w), (_, g) in zip(want_keys, want, got):
    w, g = np.asarray(w), np.asarray(g)
    if g.shape != w.shape or g.dtype != w.dtype:
      raise CheckpointError(
        f"{what} entry {key} has shape {g.shape} and dtype {g.dtype}; "
        f"this run expects {w.shape} {w.dtype}."
      )
  try:
    out = flax.serialization.from_state_dict(template, restored)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{what} does not match this run's structure: {e}"
    ) from e
  return out
