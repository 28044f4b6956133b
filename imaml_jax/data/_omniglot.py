"""Omniglot: decoding the official archives, caching, splits and rotations.

The official Omniglot release (Lake et al., 2015) ships two archives,
``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters). Inside each archive
every drawing is a 105x105 binary PNG at
``<archive>/<Alphabet>/characterNN/NNNN_KK.png``, 20 drawings per character.

Array form used throughout the library::

  images: uint8[n_classes, 20, 28, 28, 1]

Pixel convention: **ink is 255 and background is 0** (the official PNGs are
black ink on white; they are inverted here). After dividing by 255 the ink is
1 and the background 0, so zero padding and rotations add background only.

Resizing: each PNG is converted to 8-bit greyscale *before* it is resized to
28x28 with Pillow's Lanczos filter (``resample="lanczos"``, the default). The
Lanczos filter is an anti-aliasing filter whose support scales with the
downsampling factor (105/28 = 3.75), so thin strokes become grey levels
instead of disappearing or breaking up. Lanczos is also the filter named in
the preprocessing script of MAML (Finn et al., 2017), which the iMAML paper
follows. Note that that script resized the PNGs in their 1-bit mode, in which
Pillow silently falls back to nearest-neighbour sampling; converting to
greyscale first makes the filter actually apply. ``resample="box"`` (exact
area averaging, no overshoot) is available as well; the choice is part of the
cache key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")
# What Pillow raises for a malformed image file besides OSError and
# ValueError: SyntaxError (e.g. "broken PNG file" for a PNG whose chunk
# lengths are damaged) and DecompressionBombError (a damaged header that
# claims a huge image).
IMAGE_FILE_ERRORS = (SyntaxError, Image.DecompressionBombError)
OMNIGLOT_IMAGES_PER_CHARACTER = 20
CACHE_ENV_VAR = "IMAML_CACHE_DIR"

# Bump when the decoding changes in a way the cache key does not capture.
_CACHE_FORMAT = 1
_RESAMPLE = {
  "lanczos": Image.Resampling.LANCZOS,
  "box": Image.Resampling.BOX,
}


class OmniglotData(NamedTuple):
  """Omniglot characters as arrays, one row per character.

  Attributes:
    images: ``uint8[n_classes, 20, size, size, 1]``; ink 255, background 0.
    alphabets: ``str[n_classes]``, the alphabet folder of each character.
    characters: ``str[n_classes]``, the character folder (``characterNN``).
    archives: ``str[n_classes]``, ``images_background`` or
      ``images_evaluation``.

  Rows are sorted by ``(archive, alphabet, character)``, archives in the order
  background, evaluation.
  """

  images: np.ndarray
  alphabets: np.ndarray
  characters: np.ndarray
  archives: np.ndarray


class Splits(NamedTuple):
  """Meta-train, validation and test class arrays.

  Each field is ``uint8[n_classes, n_per_class, H, W, C]``, ready for
  ``jax.device_put`` and :func:`sample_tasks`.
  """

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


# ----------------------------------------------------------------------------
# Cache location and key.


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """Resolves the cache directory.

  Order: the ``cache_dir`` argument, then the ``IMAML_CACHE_DIR`` environment
  variable, then ``~/.cache/imaml_jax``. The data directory is never used, so
  it may be read-only.

  Args:
    cache_dir: an explicit directory, or ``None``.

  Returns:
    The directory as a ``Path`` (not created here).
  """
  if cache_dir is not None:
    return Path(cache_dir).expanduser()
  env = os.environ.get(CACHE_ENV_VAR)
  if env:
    return Path(env).expanduser()
  return Path.home() / ".cache" / "imaml_jax"


def _file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _cache_key(paths: Sequence[Path], image_size: int, resample: str) -> str:
  """Hash of the decoding settings and the archives' contents."""
  spec = {
    "format": _CACHE_FORMAT,
    "image_size": image_size,
    "resample": resample,
    "archives": [[p.name, p.stat().st_size, _file_sha256(p)] for p in paths],
  }
  text = json.dumps(spec, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` to ``path`` through a temporary file and a rename."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
  )
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def _load_cache(path: Path, key: str, image_size: int) -> OmniglotData | None:
  """Reads a cache file; returns ``None`` if it is absent, stale or corrupt."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["key"]) != key:
        raise ValueError("cache key mismatch")
      data = OmniglotData(
        images=f["images"],
        alphabets=f["alphabets"],
        characters=f["characters"],
        archives=f["archives"],
      )
    n = data.images.shape[0]
    expected = (n, OMNIGLOT_IMAGES_PER_CHARACTER, image_size, image_size, 1)
    if (
      data.images.dtype != np.uint8
      or data.images.shape != expected
      or any(a.shape != (n,) for a in data[1:])
    ):
      raise ValueError("unexpected array shapes")
    return data
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
      f"Ignoring unreadable Omniglot cache {path} ({e!r}); it will be rebuilt.",
      stacklevel=2,
    )
    return None


# ----------------------------------------------------------------------------
# Archive validation and decoding.


def _archive_paths(data_dir: str | os.PathLike) -> list[Path]:
  data_dir = Path(data_dir).expanduser()
  paths = [data_dir / f"{name}.zip" for name in OMNIGLOT_ARCHIVES]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(
      f"Omniglot archive(s) not found: {', '.join(missing)}. Expected "
      f"{' and '.join(n + '.zip' for n in OMNIGLOT_ARCHIVES)} in "
      f"{data_dir}; imaml_jax.data.download_omniglot(data_dir) fetches them."
    )
  return paths


def _is_metadata(member: str) -> bool:
  base = member.rsplit("/", 1)[-1]
  return (
    member.startswith("__MACOSX/")
    or base.startswith("._")
    or base == ".DS_Store"
    or member.endswith("/")
  )


def _index_archive(
  zf: zipfile.ZipFile, path: Path, top: str
) -> list[tuple[str, str, list[str]]]:
  """Lists ``(alphabet, character, sorted png members)`` and checks layout.

  Only the zip's central directory is read, so layout errors are reported
  before any image is decoded.
  """
  pattern = re.compile(
    rf"^{re.escape(top)}/([^/]+)/([^/]+)/([^/]+\.png)$", re.IGNORECASE
  )
  groups: dict[tuple[str, str], list[str]] = {}
  for member in zf.namelist():
    if _is_metadata(member):
      continue
    match = pattern.match(member)
    if match is None:
      if member.lower().endswith(".png"):
        raise ValueError(
          f"{path}: unexpected member {member!r}; expected the official "
          f"layout {top}/<Alphabet>/<character>/<image>.png"
        )
      continue
    groups.setdefault((match[1], match[2]), []).append(member)
  if not groups:
    raise ValueError(
      f"{path}: no images found under the top-level folder '{top}/'; "
      f"expected {top}/<Alphabet>/<character>/<image>.png"
    )
  for (alphabet, character), members in groups.items():
    if len(members) != OMNIGLOT_IMAGES_PER_CHARACTER:
      raise ValueError(
        f"{path}: {top}/{alphabet}/{character} has {len(members)} images, "
        f"expected {OMNIGLOT_IMAGES_PER_CHARACTER}"
      )
  return [(a, c, sorted(m)) for (a, c), m in sorted(groups.items())]


def _to_array(
  image: Image.Image, image_size: int, resample: str, ink_is_dark: bool = True
) -> np.ndarray:
  """Greyscale, ink-high, resized ``uint8[image_size, image_size]``."""
  grey = np.asarray(image.convert("L"), dtype=np.uint8)
  if ink_is_dark:
    grey = 255 - grey
  small = Image.fromarray(grey, mode="L").resize(
    (image_size, image_size), resample=_RESAMPLE[resample]
  )
  return np.asarray(small, dtype=np.uint8)


def _open_archive(path: Path, top: str):
  """Opens one archive and indexes it (central directory only)."""
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(
      f"{path} is not a readable zip archive (corrupt or truncated?): {e}"
    ) from e
  try:
    return zf, _index_archive(zf, path, top)
  except BaseException:
    zf.close()
    raise


def _decode_archive(
  zf: zipfile.ZipFile,
  index,
  path: Path,
  top: str,
  image_size: int,
  resample: str,
):
  """Decodes an indexed archive to images and metadata (in sorted order)."""
  images = np.empty(
    (len(index), OMNIGLOT_IMAGES_PER_CHARACTER, image_size, image_size, 1),
    dtype=np.uint8,
  )
  for i, (_, _, members) in enumerate(index):
    for j, member in enumerate(members):
      try:
        with Image.open(io.BytesIO(zf.read(member))) as image:
          images[i, j, :, :, 0] = _to_array(image, image_size, resample)
      except (
        zipfile.BadZipFile,
        zlib.error,
        OSError,
        EOFError,
        ValueError,
        *IMAGE_FILE_ERRORS,
      ) as e:
        raise ValueError(
          f"{path}: cannot decode member {member!r} "
          f"(corrupt or truncated archive?): {e}"
        ) from e
  alphabets = np.array([a for a, _, _ in index], dtype=str)
  characters = np.array([c for _, c, _ in index], dtype=str)
  archives = np.array([top] * len(index), dtype=str)
  return images, alphabets, characters, archives


def _check_resize_args(image_size: int, resample: str) -> None:
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if resample not in _RESAMPLE:
    raise ValueError(
      f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}"
    )


def load_omniglot(
  data_dir: str | os.PathLike,
  *,
  image_size: int = 28,
  resample: str = "lanczos",
  cache_dir: str | os.PathLike | None = None,
  use_cache: bool = True,
) -> OmniglotData:
  """Loads all 1623 Omniglot characters from the two official zip archives.

  The PNGs are read straight from ``images_background.zip`` and
  ``images_evaluation.zip`` (nothing is extracted, nothing is written into
  ``data_dir``), converted to greyscale, inverted so that ink is 255, and
  resized to ``image_size`` with an anti-aliasing filter (see the module
  docstring). The result is cached as a compressed ``.npz`` file in the cache
  directory (``cache_dir``, else ``$IMAML_CACHE_DIR``, else
  ``~/.cache/imaml_jax``). The cache key covers the decoding settings and the
  SHA-256 of both archives, so a changed archive gives a new cache file; an
  unreadable cache file is rebuilt. Cache files are written atomically
  (temporary file, then ``os.replace``). If the cache directory cannot be
  written, a warning is issued and the data is returned uncached.

  Args:
    data_dir: directory holding the two archives.
    image_size: output height and width (28 in MAML and iMAML).
    resample: ``"lanczos"`` (default) or ``"box"``.
    cache_dir: cache directory override.
    use_cache: set ``False`` to neither read nor write the cache.

  Returns:
    An :class:`OmniglotData` with ``images: uint8[1623, 20, 28, 28, 1]`` for
    the official archives, rows sorted by (archive, alphabet, character).

  Raises:
    FileNotFoundError: an archive is missing (the message names it).
    ValueError: an archive is corrupt, truncated or not in the official layout
      (the message names the archive and, where known, the member).

  Example:
    >>> data = load_omniglot("data/omniglot")  # doctest: +SKIP
    >>> data.images.shape  # doctest: +SKIP
    (1623, 20, 28, 28, 1)
  """
  _check_resize_args(image_size, resample)
  paths = _archive_paths(data_dir)
  cache_path = None
  if use_cache:
    key = _cache_key(paths, image_size, resample)
    cache_path = default_cache_dir(cache_dir) / f"omniglot-{key[:24]}.npz"
    cached = _load_cache(cache_path, key, image_size)
    if cached is not None:
      return cached
  # Open and check the layout of both archives before decoding any image.
  opened = []
  try:
    for p, top in zip(paths, OMNIGLOT_ARCHIVES):
      opened.append(_open_archive(p, top))
    parts = [
      _decode_archive(zf, index, p, top, image_size, resample)
      for (zf, index), p, top in zip(opened, paths, OMNIGLOT_ARCHIVES)
    ]
  finally:
    for zf, _ in opened:
      zf.close()
  data = OmniglotData(*(np.concatenate(field) for field in zip(*parts)))
  if cache_path is not None:
    try:
      _save_npz_atomic(cache_path, {"key": np.array(key), **data._asdict()})
    except OSError as e:
      warnings.warn(
        f"Could not write the Omniglot cache {cache_path}: {e}", stacklevel=2
      )
  return data


# ----------------------------------------------------------------------------
# TensorFlow Datasets source.


def omniglot_from_tfds_examples(
  splits: Mapping[str, Iterable[Mapping[str, np.ndarray]]],
  *,
  alphabet_names: Sequence[str],
  image_size: int = 28,
  resample: str = "lanczos",
) -> OmniglotData:
  """Converts TFDS ``omniglot`` examples to the :class:`OmniglotData` form.

  TFDS examples are dicts with ``image: uint8[105, 105, 3]`` (black ink on
  white), ``alphabet`` (index into ``alphabet_names``), ``alphabet_char_id``
  (0-based character number within the alphabet, i.e. ``characterNN`` has
  id ``NN - 1``) and ``label``. The TFDS ``train`` split is
  ``images_background`` and ``test`` is ``images_evaluation``.

  The pixels go through the same greyscale/invert/resize path as
  :func:`load_omniglot`, so the arrays agree with the zip loader up to the
  order of the 20 drawings within a class (TFDS does not keep file names).

  Args:
    splits: mapping from archive name (``"images_background"``,
      ``"images_evaluation"``) to an iterable of numpy examples.
    alphabet_names: the names of the ``alphabet`` class label.
    image_size: output height and width.
    resample: ``"lanczos"`` or ``"box"``.

  Returns:
    An :class:`OmniglotData`, rows sorted by (archive, alphabet, character).

  Raises:
    ValueError: a character does not have exactly 20 images, or an archive
      name is unknown.
  """
  _check_resize_args(image_size, resample)
  groups: dict[tuple[int, str, str], list[np.ndarray]] = {}
  for archive, examples in splits.items():
    if archive not in OMNIGLOT_ARCHIVES:
      raise ValueError(
        f"unknown archive {archive!r}; expected one of {OMNIGLOT_ARCHIVES}"
      )
    rank = OMNIGLOT_ARCHIVES.index(archive)
    for ex in examples:
      alphabet = alphabet_names[int(ex["alphabet"])]
      character = f"character{int(ex['alphabet_char_id']) + 1:02d}"
      pixels = np.asarray(ex["image"], dtype=np.uint8)
      if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
      image = Image.fromarray(pixels)
      groups.setdefault((rank, alphabet, character), []).append(
        _to_array(image, image_size, resample)
      )
  if not groups:
    raise ValueError("no TFDS examples were given")
  keys = sorted(groups)
  for rank, alphabet, character in keys:
    n = len(groups[rank, alphabet, character])
    if n != OMNIGLOT_IMAGES_PER_CHARACTER:
      raise ValueError(
        f"{OMNIGLOT_ARCHIVES[rank]}/{alphabet}/{character} has {n} images, "
        f"expected {OMNIGLOT_IMAGES_PER_CHARACTER}"
      )
  images = np.stack([np.stack(groups[k]) for k in keys])[..., None]
  return OmniglotData(
    images=images,
    alphabets=np.array([a for _, a, _ in keys], dtype=str),
    characters=np.array([c for _, _, c in keys], dtype=str),
    archives=np.array([OMNIGLOT_ARCHIVES[r] for r, _, _ in keys], dtype=str),
  )


def load_omniglot_tfds(
  *,
  data_dir: str | None = None,
  image_size: int = 28,
  resample: str = "lanczos",
) -> OmniglotData:
  """Loads Omniglot through ``tensorflow-datasets`` (optional dependency).

  Produces the same array form as :func:`load_omniglot`. Requires the
  ``tfds`` extra: ``pip install imaml_jax[tfds]``.

  Args:
    data_dir: TFDS data directory (``None`` for the TFDS default).
    image_size: output height and width.
    resample: ``"lanczos"`` or ``"box"``.

  Returns:
    An :class:`OmniglotData`.

  Raises:
    ImportError: ``tensorflow_datasets`` is not installed.
  """
  _check_resize_args(image_size, resample)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      "load_omniglot_tfds needs tensorflow-datasets, which is not "
      "installed. Install the optional 'tfds' extra: "
      "pip install imaml_jax[tfds]  (or use load_omniglot with the "
      "official zip archives)."
    ) from e
  builder = tfds.builder("omniglot", data_dir=data_dir)
  builder.download_and_prepare()
  names = builder.info.features["alphabet"].names
  splits = {
    "images_background": tfds.as_numpy(builder.as_dataset(split="train")),
    "images_evaluation": tfds.as_numpy(builder.as_dataset(split="test")),
  }
  return omniglot_from_tfds_examples(
    splits, alphabet_names=names, image_size=image_size, resample=resample
  )


# ----------------------------------------------------------------------------
# Splits and rotations.


def _name_order(data: OmniglotData) -> np.ndarray:
  """Row indices sorted by ``(archive, alphabet, character)`` name."""
  return np.lexsort(
    (
      data.characters,
      data.alphabets,
      [
        OMNIGLOT_ARCHIVES.index(a)
        if a in OMNIGLOT_ARCHIVES
        else len(OMNIGLOT_ARCHIVES)
        for a in data.archives
      ],
    )
  )


def _check_ints(minimum: int | None = 0, **values) -> None:
  """Refuses a split argument that is not an int (of at least ``minimum``)."""
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name} must be an int, got {name}={value!r}")
    if minimum is not None and value < minimum:
      raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def omniglot_split_indices(
  data: OmniglotData,
  *,
  seed: int = 0,
  n_train: int = 1200,
  n_val: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row indices of the meta-train, validation and test characters.

  Following the paper (and MAML), ``n_train = 1200`` characters are used for
  meta-training and the remaining 423 are held out for testing. The split is
  over characters, drawn from both archives:

  1. the characters are sorted by ``(archive, alphabet, character)`` name, so
     the result does not depend on file-system or zip order;
  2. ``numpy.random.default_rng(seed).permutation(n_characters)`` shuffles
     them;
  3. the first ``n_train - n_val`` are meta-train, the next ``n_val`` are
     validation (for model selection, carved out of the 1200), the rest test.

  Each returned index array is sorted. The three sets are disjoint, so test
  characters are never seen in meta-training or validation.

  Args:
    data: the loaded characters.
    seed: seed of the permutation.
    n_train: meta-training characters, validation included.
    n_val: validation characters (taken from the ``n_train``).

  Returns:
    ``(train, val, test)`` integer index arrays into ``data``'s rows.

  Raises:
    ValueError: the seed or a count is not a non-negative int, or the
      counts do not fit the number of characters.
  """
  _check_ints(seed=seed, n_train=n_train, n_val=n_val)
  n = len(data.alphabets)
  if n_val < 0 or n_train <= n_val or n_train >= n:
    raise ValueError(
      f"need 0 <= n_val < n_train < n_characters; got n_val={n_val}, "
      f"n_train={n_train}, n_characters={n}"
    )
  shuffled = _name_order(data)[np.random.default_rng(seed).permutation(n)]
  n_meta = n_train - n_val
  return (
    np.sort(shuffled[:n_meta]),
    np.sort(shuffled[n_meta:n_train]),
    np.sort(shuffled[n_train:]),
  )


def rotate_classes(images: np.ndarray) -> np.ndarray:
  """Makes each rotation by 0, 90, 180 and 270 degrees a class of its own.

  The rotated copies of a character are new classes, the augmentation that
  the papers of MAML and iMAML describe (after Santoro et al. 2016). Apply
  this per split, after splitting, so all rotations of a test character
  stay in the test set.

  Sampling ``N``-way tasks from the result can put two rotations of one
  character in a task: over ``C`` characters, with probability
  ``1 - prod_{i<N} 4 (C - i) / (4 C - i)``, 29% for 20-way tasks over the
  423 test characters and 1.8% at 5-way. MAML's code and the authors'
  instead draw ``N`` distinct characters and turn each by its own random
  multiple of 90 degrees per task: :func:`rotate_task_classes` on tasks
  drawn from unrotated characters.

  Args:
    images: ``[n, n_per_class, H, W, C]`` with ``H == W``.

  Returns:
    ``[4 n, n_per_class, H, W, C]``; row ``4 i + r`` is class ``i`` rotated
    counter-clockwise by ``r * 90`` degrees.

  Example:
    >>> import numpy as np
    >>> rotate_classes(np.zeros((3, 20, 28, 28, 1), np.uint8)).shape
    (12, 20, 28, 28, 1)
  """
  images = np.asarray(images)
  if images.ndim != 5 or images.shape[2] != images.shape[3]:
    raise ValueError(
      "expected [n, n_per_class, H, W, C] with H == W, got "
      f"shape {images.shape}"
    )
  rotated = np.stack(
    [np.rot90(images, k, axes=(2, 3)) for k in range(4)], axis=1
  )
  return rotated.reshape((-1,) + images.shape[1:])


def omniglot_splits(
  data_dir: str | os.PathLike,
  *,
  seed: int = 0,
  n_train: int = 1200,
  n_val: int = 100,
  rotations: bool = True,
  image_size: int = 28,
  resample: str = "lanczos",
  cache_dir: str | os.PathLike | None = None,
) -> Splits:
  """The standard Omniglot train / validation / test class arrays.

  Loads the archives (:func:`load_omniglot`, cached), splits the characters
  with :func:`omniglot_split_indices` and, if ``rotations``, expands each
  split with :func:`rotate_classes`. With the defaults: 1100 / 100 / 423
  characters, i.e. 4400 / 400 / 1692 classes of 20 images each.

  Args:
    data_dir: directory holding the two archives.
    seed: seed of the character permutation.
    n_train: meta-training characters, validation included (1200).
    n_val: validation characters taken from ``n_train`` (100).
    rotations: treat the four 90-degree rotations as separate classes.
    image_size: output height and width.
    resample: ``"lanczos"`` or ``"box"``.
    cache_dir: cache directory override.

  Returns:
    :class:`Splits` of ``uint8[n_classes, 20, 28, 28, 1]`` arrays.

  Raises:
    ValueError: the seed or a count is not a non-negative int, or
      ``n_val >= n_train`` (both before the archives are read).

  Example:
    >>> splits = omniglot_splits("data/omniglot")  # doctest: +SKIP
    >>> splits.train.shape  # doctest: +SKIP
    (4400, 20, 28, 28, 1)
  """
  _check_ints(seed=seed, n_train=n_train, n_val=n_val)
  if n_train <= n_val:
    raise ValueError(
      f"need 0 <= n_val < n_train; got n_val={n_val}, n_train={n_train}"
    )
  data = load_omniglot(
    data_dir, image_size=image_size, resample=resample, cache_dir=cache_dir
  )
  parts = [
    data.images[idx]
    for idx in omniglot_split_indices(
      data, seed=seed, n_train=n_train, n_val=n_val
    )
  ]
  if rotations:
    parts = [rotate_classes(p) for p in parts]
  return Splits(*parts)


# ----------------------------------------------------------------------------
# The character split of the iMAML authors' evaluation script.

# github.com/aravindr93/imaml_dev at commit 6a2a669: the evaluation script
# seeds Python's ``random`` with 12345 (examples/measure_accuracy.py, lines
# 16-24), meta-training with 123 (examples/omniglot_implicit_maml.py, lines
# 19-26); both keep the first 1200 permuted characters for meta-training
# (implicit_maml/dataset.py, line 133).
AUTHORS_TEST_SEED = 12345
AUTHORS_TRAIN_SEED = 123
AUTHORS_N_TRAIN = 1200


def authors_permutation(n: int, seed: int) -> np.ndarray:
  """The permutation ``random.seed(seed); random.shuffle(list(range(n)))``.

  This is how the authors' scripts order the characters before splitting
  them; ``random.Random(seed)`` starts from the same state as the module's
  ``random.seed(seed)``, so the permutation is theirs exactly.

  Args:
    n: number of items.
    seed: the seed of Python's ``random``.

  Returns:
    ``int64[n]``, a permutation of ``0 .. n - 1``.

  Raises:
    ValueError: ``seed`` is not an int (``random.Random(None)`` would seed
      from the operating system, a different permutation every call).

  Example:
    >>> authors_permutation(5, 0)
    array([2, 1, 0, 4, 3])
  """
  _check_ints(minimum=None, seed=seed)
  _check_ints(n=n)
  order = list(range(n))
  random.Random(seed).shuffle(order)
  return np.array(order, dtype=np.int64)


def omniglot_authors_split_indices(
  data: OmniglotData,
  *,
  seed: int = AUTHORS_TEST_SEED,
  n_train: int = AUTHORS_N_TRAIN,
) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of the characters the authors' scripts train and test on.

  The iMAML authors' code (``implicit_maml/dataset.py``, ``OmniglotTask``)
  lists the characters of ``images_background`` and then of
  ``images_evaluation`` (alphabets sorted), reorders them with
  :func:`authors_permutation` and keeps the first ``n_train = 1200`` for
  meta-training and the remaining 423 for testing. Their evaluation script
  seeds that permutation with 12345, their training script with 123; a
  split with ``seed=12345`` is therefore the evaluation's view, in which
  310 of the 423 "test" characters (73.3%) are among the 1200 that
  training with ``seed=123`` meta-trained on. That fraction compares
  positions of the two permutations only, so it holds whatever the
  character order.

  The order of the characters *within* an alphabet is not defined there
  (``os.listdir``, unsorted); here the characters are sorted by
  ``(archive, alphabet, character)`` name, as in
  :func:`omniglot_split_indices`, so the split is reproducible but names the
  same characters as the authors' only where their file system listed them
  sorted.

  Args:
    data: the loaded characters.
    seed: seed of Python's ``random`` (12345: evaluation, 123: training).
    n_train: characters before the test ones (1200).

  Returns:
    ``(train, test)`` sorted integer index arrays into ``data``'s rows.

  Raises:
    ValueError: ``seed`` or ``n_train`` is not an int, or ``n_train`` does
      not leave test characters.

  Example:
    >>> import numpy as np
    >>> names = np.array(["character01", "character02", "character03"])
    >>> data = OmniglotData(np.zeros((3, 20, 28, 28, 1), np.uint8),
    ...                     np.array(["Alpha"] * 3), names,
    ...                     np.array(["images_background"] * 3))
    >>> omniglot_authors_split_indices(data, seed=0, n_train=2)
    (array([0, 2]), array([1]))
  """
  _check_ints(minimum=None, seed=seed)
  _check_ints(n_train=n_train)
  n = len(data.alphabets)
  if not 0 < n_train < n:
    raise ValueError(
      f"need 0 < n_train < n_characters; got n_train="
      f"{n_train}, n_characters={n}"
    )
  shuffled = _name_order(data)[authors_permutation(n, seed)]
  return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])


def omniglot_authors_test(
  data_dir: str | os.PathLike,
  *,
  seed: int = AUTHORS_TEST_SEED,
  n_train: int = AUTHORS_N_TRAIN,
  image_size: int = 28,
  resample: str = "lanczos",
  cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
  """The test characters of the authors' evaluation script, unrotated.

  Loads the archives (:func:`load_omniglot`, cached) and keeps the
  characters :func:`omniglot_authors_split_indices` holds out: 423 with the
  defaults. The authors rotate every class of a task by its own random
  multiple of 90 degrees when the task is drawn
  (``implicit_maml/dataset.py``, ``OmniglotFewShotDataset.__getitem__``);
  :func:`rotate_task_classes` does that for episodes drawn from these
  characters. Pixels follow this library's convention (ink 255), the one
  its networks are trained on; the authors' are not inverted.

  Args:
    data_dir: directory holding the two archives.
    seed: seed of the permutation (12345, the evaluation script's).
    n_train: characters before the test ones (1200).
    image_size: output height and width.
    resample: ``"lanczos"`` or ``"box"``.
    cache_dir: cache directory override.

  Returns:
    ``uint8[1623 - n_train, 20, image_size, image_size, 1]``.

  Raises:
    ValueError: ``seed`` or ``n_train`` is not an int (before the archives
      are read).

  Example:
    >>> omniglot_authors_test("data/omniglot").shape  # doctest: +SKIP
    (423, 20, 28, 28, 1)
  """
  _check_ints(minimum=None, seed=seed)
  _check_ints(n_train=n_train)
  data = load_omniglot(
    data_dir, image_size=image_size, resample=resample, cache_dir=cache_dir
  )
  return data.images[
    omniglot_authors_split_indices(data, seed=seed, n_train=n_train)[1]
  ]


def rotate_task_classes(task, turns):
  """Rotates every class of each task by its own multiple of 90 degrees.

  For task ``t``, an image labelled ``c`` in its support or query set is
  turned counter-clockwise by ``90 * turns[t, c]`` degrees, so a class keeps
  one orientation across both sets. With ``turns`` drawn uniformly from
  ``{0, 1, 2, 3}`` this is the augmentation of the iMAML authors' code,
  which draws a rotation per class each time a task is built
  (``np.random.choice([0., 90., 180., 270.], size=(num_cls,))``) instead
  of making every rotation a class of its own (:func:`rotate_classes`).

  Args:
    task: a batched :class:`~imaml_jax.Task` with ``(x, y)`` sets,
      ``x: [n_tasks, n, H, W, C]`` (``H == W``), ``y: int[n_tasks, n]``.
    turns: ``int[n_tasks, n_way]`` quarter turns per task and label, any
      integers (taken modulo 4, so ``-1`` is three turns).

  Returns:
    The task with rotated images, labels unchanged.

  Raises:
    ValueError: ``turns`` is not ``[n_tasks, n]`` for the tasks' count, or
      (labels known outside a trace) a label has no column in ``turns``.
    TypeError: ``turns`` is not of an integer dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> x = jnp.arange(4.0).reshape(1, 1, 2, 2, 1)
    >>> y = jnp.zeros((1, 1), jnp.int32)
    >>> task = im.Task(support=(x, y), query=(x, y))
    >>> rotate_task_classes(task, jnp.array([[1]])).support[0][0, 0, :, :, 0]
    Array([[1., 3.],
           [0., 2.]], dtype=float32)
  """

  def rotate(x, y):
    if x.ndim != 5 or x.shape[2] != x.shape[3]:
      raise ValueError(
        "expected images [n_tasks, n, H, W, C] with H == W, "
        f"got shape {x.shape}"
      )
    # Any whole number of quarter turns: 5 turns are 1, -1 are 3.
    k = jnp.take_along_axis(turns % 4, y, axis=1)[..., None, None, None]
    out = x
    for r in range(1, 4):
      out = jnp.where(k == r, jnp.rot90(x, r, axes=(2, 3)), out)
    return out

  turns = jnp.asarray(turns)
  (xs, ys), (xq, yq) = task.support, task.query
  _check_turns(turns, (ys, yq))
  return task._replace(support=(rotate(xs, ys), ys), query=(rotate(xq, yq), yq))


def _check_turns(turns, labels) -> None:
  """Checks ``turns`` against the tasks' label arrays ``[n_tasks, n]``.

  A label without a column would be gathered out of bounds, which JAX does
  not report: its class would silently stay unrotated.
  """
  if not jnp.issubdtype(turns.dtype, jnp.integer):
    raise TypeError(
      f"turns must hold integer quarter turns, got dtype {turns.dtype}"
    )
  n_tasks = jnp.shape(labels[0])[0]
  if turns.ndim != 2 or turns.shape[0] != n_tasks:
    raise ValueError(
      f"turns must be int[n_tasks, n_way] with n_tasks={n_tasks}, got "
      f"shape {turns.shape}"
    )
  for y in labels:
    if isinstance(y, jax.core.Tracer) or not getattr(
      y, "is_fully_addressable", True
    ):
      continue
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= turns.shape[1]):
      raise ValueError(
        f"turns has {turns.shape[1]} columns (one per label) but the "
        f"labels run from {y.min()} to {y.max()}; turns must be "
        "int[n_tasks, n_way]"
      )
