"""Mini-ImageNet from its two common on-disk forms.

Array form: ``uint8[n_classes, images_per_class, 84, 84, 3]`` per split, with
the class split of Ravi & Larochelle (2017): 64 meta-train, 16 validation and
20 test classes of 600 images each.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imaml_jax.data._omniglot import IMAGE_FILE_ERRORS
from imaml_jax.data._omniglot import Splits

MINI_IMAGENET_SPLITS = ("train", "val", "test")
MINI_IMAGENET_CLASSES = (64, 16, 20)


def _check_common(images_per_class, n_classes) -> None:
  if (
    isinstance(images_per_class, bool)
    or not isinstance(images_per_class, int)
    or images_per_class <= 0
  ):
    raise ValueError(
      f"images_per_class must be a positive int, got {images_per_class!r}"
    )
  if n_classes is not None and (
    len(n_classes) != 3 or any(int(c) <= 0 for c in n_classes)
  ):
    raise ValueError(
      f"n_classes must be three positive ints or None, got {n_classes!r}"
    )


def _check_class_count(path, found: int, n_classes, split_index: int) -> None:
  if n_classes is not None and found != n_classes[split_index]:
    raise ValueError(
      f"{path}: found {found} classes, expected {n_classes[split_index]}"
    )


def _read_csv(path: Path, images_per_class: int) -> list[tuple[str, list[str]]]:
  """``[(label, [filename] * images_per_class)]`` sorted by label."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.reader(f))
  except (csv.Error, UnicodeDecodeError) as e:
    # Neither is an OSError, and csv.Error is no ValueError either.
    raise ValueError(f"{path}: not a readable CSV split file: {e}") from e
  if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
    raise ValueError(
      f"{path}: expected the header 'filename,label', got "
      f"{rows[0] if rows else 'an empty file'}"
    )
  groups: dict[str, list[str]] = {}
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != 2:
      raise ValueError(f"{path}, line {line}: expected 2 fields, got {row}")
    groups.setdefault(row[1].strip(), []).append(row[0].strip())
  for label, files in sorted(groups.items()):
    if len(files) != images_per_class:
      raise ValueError(
        f"{path}: class {label} has {len(files)} images, "
        f"expected images_per_class={images_per_class}"
      )
  return sorted(groups.items())


def load_mini_imagenet_csv(
  data_dir: str | os.PathLike,
  *,
  images_per_class: int = 600,
  image_size: int = 84,
  n_classes: Sequence[int] | None = MINI_IMAGENET_CLASSES,
) -> Splits:
  """Loads Mini-ImageNet from the Ravi & Larochelle CSV split files.

  Expects ``train.csv``, ``val.csv`` and ``test.csv`` (header
  ``filename,label``) and an ``images/`` folder holding every listed file.
  Each image is converted to RGB and resized to ``image_size`` x
  ``image_size`` with Pillow's Lanczos filter (no crop, as in the original
  preprocessing). Classes are sorted by label, images keep the CSV order.
  All files are checked to exist before any image is decoded. Decoding the
  full 60,000 images takes minutes; save the result (e.g. ``np.save``) to
  reuse it.

  Args:
    data_dir: directory with the CSV files and ``images/``.
    images_per_class: images listed per class (600; smaller for tests).
    image_size: output height and width.
    n_classes: expected class counts of train/val/test (64, 16, 20), or
      ``None`` to accept any.

  Returns:
    :class:`Splits` of ``uint8[n_classes, images_per_class, 84, 84, 3]``.

  Raises:
    FileNotFoundError: a CSV file or a listed image is missing.
    ValueError: a malformed or unreadable CSV (the message names it), wrong
      counts, an unreadable image, or an ``image_size`` that is not a
      positive int (before any file is read).

  Example:
    >>> splits = load_mini_imagenet_csv("data/mini-imagenet")  # doctest: +SKIP
    >>> splits.train.shape  # doctest: +SKIP
    (64, 600, 84, 84, 3)
  """
  _check_common(images_per_class, n_classes)
  if (
    isinstance(image_size, bool)
    or not isinstance(image_size, int)
    or image_size <= 0
  ):
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  data_dir = Path(data_dir).expanduser()
  csv_paths = [data_dir / f"{s}.csv" for s in MINI_IMAGENET_SPLITS]
  missing = [str(p) for p in csv_paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(
      f"Mini-ImageNet split file(s) not found: {', '.join(missing)}"
    )
  image_dir = data_dir / "images"
  tables = []
  for i, path in enumerate(csv_paths):
    table = _read_csv(path, images_per_class)
    _check_class_count(path, len(table), n_classes, i)
    tables.append(table)
  for path, table in zip(csv_paths, tables):
    for _, files in table:
      for name in files:
        if not (image_dir / name).is_file():
          raise FileNotFoundError(
            f"{image_dir / name} (listed in {path}) does not exist"
          )
  out = []
  for table in tables:
    arr = np.empty(
      (len(table), images_per_class, image_size, image_size, 3), np.uint8
    )
    for c, (_, files) in enumerate(table):
      for j, name in enumerate(files):
        try:
          with Image.open(image_dir / name) as image:
            arr[c, j] = np.asarray(
              image.convert("RGB").resize(
                (image_size, image_size), Image.Resampling.LANCZOS
              )
            )
        except (OSError, ValueError, *IMAGE_FILE_ERRORS) as e:
          raise ValueError(f"cannot decode {image_dir / name}: {e}") from e
    out.append(arr)
  return Splits(*out)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds numpy arrays, dtypes and builtin containers.

  Allowed globals: numpy's array/dtype reconstructors, builtin container and
  scalar types, and ``_codecs.encode`` (how old protocols store bytes). Any
  other global (e.g. ``os.system``) raises ``pickle.UnpicklingError``, so
  a tampered file cannot run code through ``find_class``.
  """

  _NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
  }
  # Protocol 0-2 pickles write ``bytes`` as ``_codecs.encode(text, "latin1")``.
  _CODECS = {("_codecs", "encode")}
  _BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "complex",
  }

  def find_class(self, module, name):
    if (module, name) in self._NUMPY:
      if module.startswith("numpy.core.") and hasattr(np, "_core"):
        module = "numpy._core." + module[len("numpy.core.") :]
      return super().find_class(module, name)
    if (module, name) in self._CODECS:
      return super().find_class(module, name)
    if module in ("builtins", "__builtin__") and name in self._BUILTINS:
      return super().find_class("builtins", name)
    raise pickle.UnpicklingError(
      f"refusing to load global {module}.{name}: only numpy arrays and "
      "builtin containers are allowed in a Mini-ImageNet cache file"
    )


def _load_restricted_pickle(path: Path):
  with open(path, "rb") as f:
    try:
      return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (
      pickle.UnpicklingError,
      EOFError,
      ValueError,
      TypeError,
      AttributeError,
      ImportError,
      IndexError,
    ) as e:
      raise ValueError(
        f"{path}: not a readable Mini-ImageNet cache pickle: {e}"
      ) from e
    except (OverflowError, MemoryError) as e:
      # A damaged length field (e.g. of a protocol-4 frame) asks for more
      # bytes than can exist or be held.
      raise ValueError(
        f"{path}: not a readable Mini-ImageNet cache pickle (a damaged "
        f"length, or more than this machine's memory): {e!r}"
      ) from e


def load_mini_imagenet_pickle(
  data_dir: str | os.PathLike,
  *,
  images_per_class: int = 600,
  n_classes: Sequence[int] | None = MINI_IMAGENET_CLASSES,
) -> Splits:
  """Loads the pickled Mini-ImageNet cache (``mini-imagenet-cache-*.pkl``).

  Each of ``mini-imagenet-cache-{train,val,test}.pkl`` holds a dict with
  ``'image_data'``: ``uint8[n, 84, 84, 3]`` and ``'class_dict'``: class name
  -> list of row indices into ``image_data``.

  Security: a pickle can normally run arbitrary code when loaded. These files
  are read with a restricted unpickler that only rebuilds numpy arrays,
  dtypes and builtin containers and refuses every other global, which blocks
  that route; still, only load files whose origin you trust.

  Args:
    data_dir: directory with the three pickle files.
    images_per_class: images per class (600; smaller for tests). Classes with
      a different number of indices are an error.
    n_classes: expected class counts of train/val/test (64, 16, 20), or
      ``None`` to accept any.

  Returns:
    :class:`Splits` of ``uint8[n_classes, images_per_class, 84, 84, 3]``,
    classes sorted by name.

  Raises:
    FileNotFoundError: a pickle file is missing.
    ValueError: a file is unreadable, holds forbidden globals, or has the
      wrong structure or counts.

  Example:
    >>> splits = load_mini_imagenet_pickle("data/mini-imagenet")  # doctest: +SKIP
    >>> splits.test.shape  # doctest: +SKIP
    (20, 600, 84, 84, 3)
  """
  _check_common(images_per_class, n_classes)
  data_dir = Path(data_dir).expanduser()
  paths = [
    data_dir / f"mini-imagenet-cache-{s}.pkl" for s in MINI_IMAGENET_SPLITS
  ]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(
      f"Mini-ImageNet cache file(s) not found: {', '.join(missing)}"
    )
  out = []
  for i, path in enumerate(paths):
    obj = _load_restricted_pickle(path)
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= set(
      obj
    ):
      raise ValueError(
        f"{path}: expected a dict with keys 'image_data' and 'class_dict'"
      )
    images = obj["image_data"]
    class_dict = obj["class_dict"]
    if (
      not isinstance(images, np.ndarray)
      or images.dtype != np.uint8
      or images.ndim != 4
      or images.shape[-1] != 3
    ):
      raise ValueError(
        f"{path}: 'image_data' must be uint8[n, H, W, 3], got "
        f"{getattr(images, 'dtype', type(images))} "
        f"{getattr(images, 'shape', '')}"
      )
    if not isinstance(class_dict, dict) or not class_dict:
      raise ValueError(f"{path}: 'class_dict' must be a non-empty dict")
    _check_class_count(path, len(class_dict), n_classes, i)
    rows = []
    for name in sorted(class_dict):
      idx = np.asarray(class_dict[name])
      if idx.ndim != 1 or idx.shape[0] != images_per_class:
        raise ValueError(
          f"{path}: class {name} has {idx.size} images, expected "
          f"images_per_class={images_per_class}"
        )
      if not np.issubdtype(idx.dtype, np.integer) or (
        idx.min() < 0 or idx.max() >= images.shape[0]
      ):
        raise ValueError(
          f"{path}: class {name} has indices outside 0..{images.shape[0] - 1}"
        )
      rows.append(idx)
    out.append(images[np.stack(rows)])
  return Splits(*out)
