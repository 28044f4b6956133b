"""Tests of the Omniglot loader, cache, split, rotations and bad input."""

import io
import os
import random
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imaml_jax import data as imdata
from imaml_jax.data import _omniglot

ENV = "IMAML_OMNIGLOT_DIR"
REPO = Path(__file__).resolve().parents[1]


def real_omniglot_dir() -> Path:
  """The real data directory from ``$IMAML_OMNIGLOT_DIR``.

  Unset: the test is skipped. Set but missing archives: the test fails.
  """
  value = os.environ.get(ENV)
  if not value:
    pytest.skip(f"{ENV} is not set")
  path = Path(value)
  if not path.is_absolute() and not path.exists():
    path = REPO / path
  missing = [
    n
    for n in ("images_background.zip", "images_evaluation.zip")
    if not (path / n).is_file()
  ]
  if missing:
    pytest.fail(f"{ENV}={value} is set but {path} lacks {missing}")
  return path


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot_data(omniglot_cache):
  """All 1623 characters, decoded once per session into a temporary cache."""
  path = real_omniglot_dir()
  start = time.perf_counter()
  data = imdata.load_omniglot(path, cache_dir=omniglot_cache)
  sys.stderr.write(
    f"\nOmniglot first decode: {time.perf_counter() - start:.1f} s\n"
  )
  return data


# ----------------------------------------------------------------------------
# Tiny archives in the official layout.


def _png(seed: int, size: int = 105) -> bytes:
  """A 1-bit PNG: white background, black ink square at a seeded spot."""
  rng = np.random.default_rng(seed)
  pixels = np.ones((size, size), bool)
  r, c = rng.integers(0, size - 30, 2)
  pixels[r : r + 30, c : c + 30] = False
  buf = io.BytesIO()
  Image.fromarray(pixels).convert("1").save(buf, format="PNG")
  return buf.getvalue()


def make_archive(
  path: Path, top: str, chars, n_images: int = 20, seed: int = 0
) -> Path:
  """Writes ``top/<alphabet>/<character>/NNNN_KK.png`` for ``chars``."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for i, (alphabet, character) in enumerate(chars):
      for k in range(n_images):
        name = f"{top}/{alphabet}/{character}/{i + 1:04d}_{k + 1:02d}.png"
        zf.writestr(name, _png(seed + 1000 * i + k))
    zf.writestr(f"{top}/.DS_Store", b"junk")
  return path


BACKGROUND = [
  ("Beta", "character02"),
  ("Beta", "character01"),
  ("Alpha", "character01"),
]
EVALUATION = [("Gamma", "character01"), ("Gamma", "character02")]


@pytest.fixture
def tiny_dir(tmp_path):
  d = tmp_path / "omniglot"
  d.mkdir()
  make_archive(d / "images_background.zip", "images_background", BACKGROUND)
  make_archive(
    d / "images_evaluation.zip", "images_evaluation", EVALUATION, seed=7
  )
  return d


@pytest.fixture
def cache(tmp_path):
  return tmp_path / "cache"


def test_tiny_archives_load_sorted_with_ink_high(tiny_dir, cache):
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  assert data.images.shape == (5, 20, 28, 28, 1)
  assert data.images.dtype == np.uint8
  assert list(data.alphabets) == ["Alpha", "Beta", "Beta", "Gamma", "Gamma"]
  assert list(data.characters) == [
    "character01",
    "character01",
    "character02",
    "character01",
    "character02",
  ]
  assert (
    list(data.archives) == ["images_background"] * 3 + ["images_evaluation"] * 2
  )
  # A 30x30 ink square on 105x105 covers 8% of the image: ink is high.
  frac = data.images.astype(np.float64).mean() / 255
  assert 0.05 < frac < 0.12
  assert data.images.max() == 255 and data.images.min() == 0


def test_pixels_match_a_direct_decode(tiny_dir, cache):
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache, resample="box")
  with zipfile.ZipFile(tiny_dir / "images_background.zip") as zf:
    raw = zf.read("images_background/Alpha/character01/0003_05.png")
  grey = 255 - np.asarray(Image.open(io.BytesIO(raw)).convert("L"))
  expected = np.asarray(Image.fromarray(grey).resize((28, 28), Image.BOX))
  np.testing.assert_array_equal(data.images[0, 4, :, :, 0], expected)


def test_cache_is_used_on_the_second_load(tiny_dir, cache, monkeypatch):
  first = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  files = list(cache.glob("*.npz"))
  assert len(files) == 1
  assert not list(cache.glob("*.tmp"))

  def fail(*args, **kwargs):
    raise AssertionError("decoded again despite a valid cache")

  monkeypatch.setattr(_omniglot, "_decode_archive", fail)
  second = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_cache_dir_from_environment(tiny_dir, tmp_path, monkeypatch):
  env_cache = tmp_path / "env_cache"
  monkeypatch.setenv("IMAML_CACHE_DIR", str(env_cache))
  assert imdata.default_cache_dir() == env_cache
  assert imdata.default_cache_dir(tmp_path / "x") == tmp_path / "x"
  imdata.load_omniglot(tiny_dir)
  assert len(list(env_cache.glob("omniglot-*.npz"))) == 1
  monkeypatch.delenv("IMAML_CACHE_DIR")
  assert imdata.default_cache_dir() == Path.home() / ".cache" / "imaml_jax"


def test_resize_settings_are_part_of_the_cache_key(tiny_dir, cache):
  a = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  b = imdata.load_omniglot(tiny_dir, cache_dir=cache, resample="box")
  c = imdata.load_omniglot(tiny_dir, cache_dir=cache, image_size=14)
  assert len(list(cache.glob("*.npz"))) == 3
  assert not np.array_equal(a.images, b.images)
  assert c.images.shape[2:4] == (14, 14)


def test_changed_archive_invalidates_the_cache(tiny_dir, cache):
  before = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  make_archive(
    tiny_dir / "images_evaluation.zip", "images_evaluation", EVALUATION, seed=99
  )
  after = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  np.testing.assert_array_equal(before.images[:3], after.images[:3])
  assert not np.array_equal(before.images[3:], after.images[3:])
  assert len(list(cache.glob("*.npz"))) == 2


def test_changed_archive_of_the_same_size_invalidates_the_cache(
  tiny_dir, cache
):
  before = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  path = tiny_dir / "images_evaluation.zip"
  size = path.stat().st_size
  # The same drawings with the two characters' drawings swapped.
  make_archive(path, "images_evaluation", EVALUATION[::-1], seed=7)
  assert path.stat().st_size == size
  after = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  np.testing.assert_array_equal(before.images[3], after.images[4])
  np.testing.assert_array_equal(before.images[4], after.images[3])
  assert not np.array_equal(before.images[3], after.images[3])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_arrays"])
def test_corrupt_cache_is_rebuilt(tiny_dir, cache, damage):
  good = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  (path,) = cache.glob("*.npz")
  if damage == "garbage":
    path.write_bytes(b"not an npz file")
  elif damage == "truncated":
    path.write_bytes(path.read_bytes()[:200])
  else:
    with np.load(path) as f:
      key = f["key"]
    np.savez(path, key=key, images=np.zeros((2, 3), np.uint8))
  with pytest.warns(UserWarning, match="cache"):
    rebuilt = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  np.testing.assert_array_equal(good.images, rebuilt.images)
  # The rebuilt file is valid again.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_nothing_written_to_the_data_dir(tiny_dir, cache):
  before = sorted(os.listdir(tiny_dir))
  imdata.load_omniglot(tiny_dir, cache_dir=cache)
  imdata.load_omniglot(tiny_dir, cache_dir=cache)
  assert sorted(os.listdir(tiny_dir)) == before


def test_unwritable_cache_warns_and_still_loads(tiny_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.warns(UserWarning, match="Could not write"):
    data = imdata.load_omniglot(tiny_dir, cache_dir=blocker / "sub")
  assert data.images.shape[0] == 5


# ----------------------------------------------------------------------------
# Bad input.


@pytest.fixture
def no_decode(monkeypatch):
  """Fails the test if any image is decoded."""

  def fail(*args, **kwargs):
    raise AssertionError("decoded an image before checking the input")

  monkeypatch.setattr(_omniglot, "_to_array", fail)


def test_missing_archive(tiny_dir, cache, no_decode):
  (tiny_dir / "images_evaluation.zip").unlink()
  with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)
  with pytest.raises(FileNotFoundError, match="images_background.zip"):
    imdata.load_omniglot(tiny_dir / "nope", cache_dir=cache)


def test_not_a_zip(tiny_dir, cache, no_decode):
  (tiny_dir / "images_background.zip").write_bytes(b"PK\x03\x04 garbage" * 9)
  with pytest.raises(ValueError, match="images_background.zip"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_truncated_zip(tiny_dir, cache, no_decode):
  path = tiny_dir / "images_evaluation.zip"
  path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
  with pytest.raises(ValueError, match="images_evaluation.zip.*truncated"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_corrupt_member_names_the_member(tiny_dir, cache):
  path = tiny_dir / "images_background.zip"
  member = "images_background/Beta/character01/0002_03.png"
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(member)
  raw = bytearray(path.read_bytes())
  name_len = int.from_bytes(
    raw[info.header_offset + 26 : info.header_offset + 28], "little"
  )
  extra_len = int.from_bytes(
    raw[info.header_offset + 28 : info.header_offset + 30], "little"
  )
  start = info.header_offset + 30 + name_len + extra_len
  for i in range(start + 10, start + info.compress_size - 2):
    raw[i] ^= 0x5A
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="images_background.zip.*0002_03.png"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def broken_png(seed: int = 0) -> bytes:
  """A PNG whose IDAT length is halved: Pillow fails with a SyntaxError."""
  png = _png(seed)
  at = png.index(b"IDAT")
  length = int.from_bytes(png[at - 4 : at], "big")
  return png[: at - 4] + (length // 2).to_bytes(4, "big") + png[at:]


def test_broken_png_in_an_intact_zip_names_the_member(tiny_dir, cache):
  """The zip's checksums hold (it was built from a damaged file)."""
  with pytest.raises(SyntaxError, match="broken PNG"):
    with Image.open(io.BytesIO(broken_png())) as image:
      image.load()
  path = tiny_dir / "images_evaluation.zip"
  member = "images_evaluation/Gamma/character02/0002_07.png"
  with zipfile.ZipFile(path) as zf:
    members = {name: zf.read(name) for name in zf.namelist()}
  members[member] = broken_png()
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, raw in members.items():
      zf.writestr(name, raw)
  with pytest.raises(
    ValueError, match="images_evaluation.zip: cannot decode member .*0002_07"
  ):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_wrong_top_folder(tiny_dir, cache, no_decode):
  make_archive(tiny_dir / "images_background.zip", "omniglot", BACKGROUND)
  with pytest.raises(ValueError, match="images_background.zip.*omniglot/"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_no_images_under_top_folder(tiny_dir, cache, no_decode):
  with zipfile.ZipFile(tiny_dir / "images_evaluation.zip", "w") as zf:
    zf.writestr("images_evaluation/readme.txt", b"hi")
  with pytest.raises(ValueError, match="no images found.*images_evaluation/"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_wrong_number_of_images_per_character(tiny_dir, cache, no_decode):
  make_archive(
    tiny_dir / "images_background.zip",
    "images_background",
    BACKGROUND,
    n_images=19,
  )
  with pytest.raises(ValueError, match="has 19 images, expected 20"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache)


def test_bad_resize_arguments(tiny_dir, cache, no_decode):
  with pytest.raises(ValueError, match="resample"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache, resample="bilinear")
  with pytest.raises(ValueError, match="image_size"):
    imdata.load_omniglot(tiny_dir, cache_dir=cache, image_size=0)


def test_split_counts_are_checked_before_loading(tiny_dir, cache, no_decode):
  with pytest.raises(ValueError, match="n_val=100, n_train=50"):
    imdata.omniglot_splits(tiny_dir, n_train=50, n_val=100, cache_dir=cache)
  with pytest.raises(ValueError, match="n_val=-1"):
    imdata.omniglot_splits(tiny_dir, n_val=-1, cache_dir=cache)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"seed": None}, "seed must be an int, got seed=None"),
    ({"seed": 1.5}, "seed must be an int, got seed=1.5"),
    ({"n_train": 3.0, "n_val": 1}, "n_train must be an int"),
    ({"n_train": 3, "n_val": "1"}, "n_val must be an int"),
  ],
)
def test_split_arguments_of_a_wrong_type_are_refused_before_loading(
  tiny_dir, cache, no_decode, kwargs, match
):
  # A seed of None would draw a new split from the operating system's
  # entropy on every call, so training and testing could split differently.
  with pytest.raises(ValueError, match=match):
    imdata.omniglot_splits(tiny_dir, cache_dir=cache, **kwargs)
  if "seed" in kwargs:
    with pytest.raises(ValueError, match=match):
      imdata.omniglot_authors_test(tiny_dir, cache_dir=cache, **kwargs)
    with pytest.raises(ValueError, match=match):
      imdata.authors_permutation(10, kwargs["seed"])


def test_split_indices_refuse_a_seed_of_none(tiny_dir, cache):
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  with pytest.raises(ValueError, match="seed must be an int, got seed=None"):
    imdata.omniglot_split_indices(data, seed=None, n_train=3, n_val=1)
  with pytest.raises(ValueError, match="seed must be an int, got seed=None"):
    imdata.omniglot_authors_split_indices(data, seed=None, n_train=3)


def test_split_larger_than_data(tiny_dir, cache):
  with pytest.raises(ValueError, match="n_train=1200, n_characters=5"):
    imdata.omniglot_splits(tiny_dir, cache_dir=cache)


# ----------------------------------------------------------------------------
# Rotations and split on small arrays.


def test_rotate_classes():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 2, 5, 5, 1), dtype=np.uint8)
  rotated = imdata.rotate_classes(images)
  assert rotated.shape == (12, 2, 5, 5, 1)
  for i in range(3):
    for r in range(4):
      np.testing.assert_array_equal(
        rotated[4 * i + r], np.rot90(images[i], r, axes=(1, 2))
      )
  with pytest.raises(ValueError, match="H == W"):
    imdata.rotate_classes(np.zeros((2, 3, 4, 5, 1)))


def test_tasks_over_rotated_classes_pair_rotations_as_documented():
  # rotate_classes documents how often a task holds two rotations of one
  # character: 1 - prod_{i<N} 4 (C - i) / (4 C - i). Each character's
  # images are filled with its index, so a task's characters can be read
  # back from its pixels; the frequency over many tasks must match.
  import jax

  n_chars, n_way, n_tasks = 30, 5, 4000
  images = np.broadcast_to(
    np.arange(n_chars, dtype=np.uint8)[:, None, None, None, None],
    (n_chars, 2, 4, 4, 1),
  )
  tasks = imdata.sample_tasks(
    jax.random.key(0), imdata.rotate_classes(images), n_way, 1, 1, n_tasks
  )
  chars = np.rint(np.asarray(tasks.support[0])[:, :, 0, 0, 0] * 255)
  paired = np.mean([len(set(c)) < n_way for c in chars])
  expected = 1 - np.prod(
    [4 * (n_chars - i) / (4 * n_chars - i) for i in range(n_way)]
  )
  sd = np.sqrt(expected * (1 - expected) / n_tasks)
  assert abs(paired - expected) < 4 * sd, (paired, expected)


def test_small_split_through_omniglot_splits(tiny_dir, cache):
  splits = imdata.omniglot_splits(tiny_dir, n_train=3, n_val=1, cache_dir=cache)
  assert [s.shape[0] for s in splits] == [8, 4, 8]
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  idx = imdata.omniglot_split_indices(data, n_train=3, n_val=1)
  for s, i in zip(splits, idx):
    np.testing.assert_array_equal(s, imdata.rotate_classes(data.images[i]))
  plain = imdata.omniglot_splits(
    tiny_dir, n_train=3, n_val=1, rotations=False, cache_dir=cache
  )
  assert [s.shape[0] for s in plain] == [2, 1, 2]


def test_split_follows_the_seed_not_the_row_order(tiny_dir, cache):
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  names = np.array(
    ["/".join(n) for n in zip(data.archives, data.alphabets, data.characters)]
  )
  perm = np.array([4, 2, 0, 3, 1])
  shuffled = imdata.OmniglotData(*(field[perm] for field in data))
  tests = set()
  for seed in range(4):
    idx = imdata.omniglot_split_indices(data, seed=seed, n_train=3, n_val=1)
    tests.add(tuple(names[idx[2]]))
    # The same characters whatever the order of the rows.
    for i, j in zip(
      idx,
      imdata.omniglot_split_indices(shuffled, seed=seed, n_train=3, n_val=1),
    ):
      assert sorted(names[i]) == sorted(names[perm][j])
    # omniglot_splits uses the seed it is given.
    splits = imdata.omniglot_splits(
      tiny_dir, seed=seed, n_train=3, n_val=1, cache_dir=cache
    )
    for s, i in zip(splits, idx):
      np.testing.assert_array_equal(s, imdata.rotate_classes(data.images[i]))
  assert len(tests) > 1


# ----------------------------------------------------------------------------
# The authors' character split and per-task rotations.


def test_authors_permutation_is_pythons_seeded_shuffle():
  state = random.getstate()
  try:
    random.seed(12345)  # As the authors' evaluation script does.
    expected = list(range(1623))
    random.shuffle(expected)
  finally:
    random.setstate(state)
  np.testing.assert_array_equal(
    imdata.authors_permutation(1623, imdata.AUTHORS_TEST_SEED), expected
  )
  assert not np.array_equal(imdata.authors_permutation(1623, 123), expected)


def test_authors_split_on_tiny_archives(tiny_dir, cache):
  data = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  train, test = imdata.omniglot_authors_split_indices(data, seed=3, n_train=3)
  order = imdata.authors_permutation(5, 3)  # rows are in name order
  np.testing.assert_array_equal(train, np.sort(order[:3]))
  np.testing.assert_array_equal(test, np.sort(order[3:]))
  # The rows' order does not change which characters are chosen.
  perm = np.array([4, 2, 0, 3, 1])
  shuffled = imdata.OmniglotData(*(field[perm] for field in data))
  test_s = imdata.omniglot_authors_split_indices(shuffled, seed=3, n_train=3)[1]
  np.testing.assert_array_equal(np.sort(perm[test_s]), test)
  np.testing.assert_array_equal(
    imdata.omniglot_authors_test(tiny_dir, seed=3, n_train=3, cache_dir=cache),
    data.images[test],
  )
  with pytest.raises(ValueError, match="n_train=5, n_characters=5"):
    imdata.omniglot_authors_split_indices(data, n_train=5)


@pytest.mark.parametrize("low, high", [(0, 4), (-5, 9)])
def test_rotate_task_classes_turns_each_class_once_in_both_sets(low, high):
  """Turns outside 0..3 count modulo 4: 5 is one turn, -1 three."""
  import imaml_jax as im

  rng = np.random.default_rng(0)
  n_tasks, n_way = 3, 4
  xs = rng.random((n_tasks, n_way * 2, 5, 5, 1)).astype(np.float32)
  ys = np.tile(np.repeat(rng.permutation(n_way), 2), (n_tasks, 1))
  xq = rng.random((n_tasks, n_way * 3, 5, 5, 1)).astype(np.float32)
  yq = np.tile(np.repeat(np.arange(n_way), 3), (n_tasks, 1))
  turns = rng.integers(low, high, (n_tasks, n_way))
  task = imdata.rotate_task_classes(
    im.Task(support=(xs, ys), query=(xq, yq)), turns
  )
  for (x, y), (got, labels) in zip(
    ((xs, ys), (xq, yq)), (task.support, task.query)
  ):
    np.testing.assert_array_equal(labels, y)
    for t in range(n_tasks):
      for i in range(y.shape[1]):
        np.testing.assert_array_equal(
          got[t, i], np.rot90(x[t, i], turns[t, y[t, i]], axes=(0, 1))
        )


def test_rotate_task_classes_refuses_turns_that_miss_a_label():
  import jax

  images = np.arange(10 * 20 * 16, dtype=np.uint32).reshape(10, 20, 4, 4, 1)
  tasks = imdata.sample_tasks(
    jax.random.key(0), (images % 251).astype(np.uint8), 5, 1, 2, 3
  )
  # Three columns for five labels: labels 3 and 4 would stay unrotated.
  with pytest.raises(ValueError, match="3 columns .* labels run from 0 to 4"):
    imdata.rotate_task_classes(tasks, np.ones((3, 3), np.int32))
  with pytest.raises(ValueError, match=r"n_tasks=3, got shape \(1, 5\)"):
    imdata.rotate_task_classes(tasks, np.ones((1, 5), np.int32))
  with pytest.raises(ValueError, match=r"got shape \(5,\)"):
    imdata.rotate_task_classes(tasks, np.ones(5, np.int32))
  with pytest.raises(TypeError, match="integer quarter turns"):
    imdata.rotate_task_classes(tasks, np.full((3, 5), 0.5))
  # Under jit the labels are not known; the shapes are still checked.
  turns = np.full((3, 5), 2, np.int32)
  jitted = jax.jit(imdata.rotate_task_classes)(tasks, turns)
  np.testing.assert_array_equal(
    jitted.query[0], np.rot90(tasks.query[0], 2, axes=(2, 3))
  )


# ----------------------------------------------------------------------------
# TensorFlow Datasets source.


def test_tfds_missing_gives_a_clear_import_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"imaml_jax\[tfds\]"):
    imdata.load_omniglot_tfds()


def test_tfds_conversion_matches_the_zip_loader(tiny_dir, cache):
  """Fake TFDS examples (RGB, ink dark) give the same arrays as the zips."""
  alphabet_names = ["Alpha", "Beta", "Gamma"]
  splits = {}
  for top in _omniglot.OMNIGLOT_ARCHIVES:
    examples = []
    with zipfile.ZipFile(tiny_dir / f"{top}.zip") as zf:
      pngs = [n for n in zf.namelist() if n.endswith(".png")]
      # Interleave the classes (drawing 1 of every class, then drawing 2, ...)
      # while each class keeps its drawings in file-name order.
      for name in sorted(pngs, key=lambda n: (n[-6:], n)):
        _, alphabet, character, _ = name.split("/")
        rgb = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
        examples.append(
          {
            "image": rgb,
            "alphabet": np.int64(alphabet_names.index(alphabet)),
            "alphabet_char_id": np.int64(int(character[-2:]) - 1),
            "label": np.int64(0),
          }
        )
    splits[top] = examples
  converted = imdata.omniglot_from_tfds_examples(
    splits, alphabet_names=alphabet_names
  )
  loaded = imdata.load_omniglot(tiny_dir, cache_dir=cache)
  for a, b in zip(converted, loaded):
    np.testing.assert_array_equal(a, b)


def test_tfds_conversion_rejects_incomplete_classes():
  example = {
    "image": np.full((105, 105, 3), 255, np.uint8),
    "alphabet": 0,
    "alphabet_char_id": 0,
    "label": 0,
  }
  with pytest.raises(ValueError, match="Alpha/character01 has 3 images"):
    imdata.omniglot_from_tfds_examples(
      {"images_background": [example] * 3}, alphabet_names=["Alpha"]
    )
  with pytest.raises(ValueError, match="unknown archive"):
    imdata.omniglot_from_tfds_examples(
      {"train": [example]}, alphabet_names=["Alpha"]
    )


# ----------------------------------------------------------------------------
# The real data.


@pytest.mark.slow
def test_real_omniglot_arrays(omniglot_data):
  data = omniglot_data
  assert data.images.shape == (1623, 20, 28, 28, 1)
  assert data.images.dtype == np.uint8
  assert (data.archives == "images_background").sum() == 964
  assert (data.archives == "images_evaluation").sum() == 659
  assert len(set(data.alphabets[data.archives == "images_background"])) == 30
  assert len(set(data.alphabets[data.archives == "images_evaluation"])) == 20
  names = set(zip(data.archives, data.alphabets, data.characters))
  assert len(names) == 1623
  # Ink (255) is the minority: background 0 dominates.
  mean = data.images.mean() / 255
  assert 0.03 < mean < 0.2, mean
  assert data.images.max() == 255
  assert (data.images[:, :, 0, 0, 0] == 0).mean() > 0.95  # corners empty


@pytest.mark.slow
def test_real_omniglot_cached_load_is_fast(omniglot_data, omniglot_cache):
  start = time.perf_counter()
  again = imdata.load_omniglot(real_omniglot_dir(), cache_dir=omniglot_cache)
  elapsed = time.perf_counter() - start
  sys.stderr.write(f"\nOmniglot cached load: {elapsed:.3f} s\n")
  assert elapsed < 1.0
  np.testing.assert_array_equal(again.images, omniglot_data.images)


@pytest.mark.slow
def test_real_split_sizes_and_disjointness(omniglot_data):
  data = omniglot_data
  train, val, test = imdata.omniglot_split_indices(data, seed=0)
  assert (len(train), len(val), len(test)) == (1100, 100, 423)
  names = [
    set(zip(data.archives[i], data.alphabets[i], data.characters[i]))
    for i in (train, val, test)
  ]
  assert not names[0] & names[2]
  assert not names[1] & names[2]
  assert not names[0] & names[1]
  assert len(names[0] | names[1] | names[2]) == 1623
  # Deterministic, seed-dependent and independent of the row order.
  again = imdata.omniglot_split_indices(data, seed=0)
  for a, b in zip((train, val, test), again):
    np.testing.assert_array_equal(a, b)
  other = imdata.omniglot_split_indices(data, seed=1)
  assert not np.array_equal(other[2], test)
  perm = np.random.default_rng(5).permutation(1623)
  shuffled = imdata.OmniglotData(*(field[perm] for field in data))
  test_s = imdata.omniglot_split_indices(shuffled, seed=0)[2]
  assert (
    set(
      zip(
        shuffled.archives[test_s],
        shuffled.alphabets[test_s],
        shuffled.characters[test_s],
      )
    )
    == names[2]
  )


@pytest.mark.slow
def test_real_omniglot_splits(omniglot_data, omniglot_cache):
  splits = imdata.omniglot_splits(
    real_omniglot_dir(), seed=0, cache_dir=omniglot_cache
  )
  assert splits.train.shape == (4400, 20, 28, 28, 1)
  assert splits.val.shape == (400, 20, 28, 28, 1)
  assert splits.test.shape == (1692, 20, 28, 28, 1)
  test_idx = imdata.omniglot_split_indices(omniglot_data, seed=0)[2]
  np.testing.assert_array_equal(
    splits.test, imdata.rotate_classes(omniglot_data.images[test_idx])
  )


@pytest.mark.slow
def test_real_authors_split_and_its_overlap(omniglot_data, omniglot_cache):
  """The authors' evaluation tests mostly on characters trained on."""
  data = omniglot_data
  train, test = imdata.omniglot_authors_split_indices(data)
  assert (len(train), len(test)) == (1200, 423)
  assert not set(train) & set(test)
  # Their training script's permutation (seed 123) keeps 310 of the 423
  # (73.3%) for meta-training, whatever the order of the characters.
  authors_train = imdata.omniglot_authors_split_indices(data, seed=123)[0]
  assert np.isin(test, authors_train).sum() == 310
  # Against this library's split (seed 0): 281 meta-training (66.4%), 18
  # validation and 124 test characters.
  ours = imdata.omniglot_split_indices(data, seed=0)
  assert [int(np.isin(test, idx).sum()) for idx in ours] == [281, 18, 124]
  np.testing.assert_array_equal(
    imdata.omniglot_authors_test(real_omniglot_dir(), cache_dir=omniglot_cache),
    data.images[test],
  )
