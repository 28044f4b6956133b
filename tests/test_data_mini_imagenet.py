"""Tests of the Mini-ImageNet loaders on tiny fixtures in both formats."""

import csv
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from imaml_jax import data as imdata

# split -> {class name: colour}; 3 / 2 / 2 classes of 4 images.
CLASSES = {
  "train": {"n03": (200, 30, 30), "n01": (30, 200, 30), "n02": (30, 30, 200)},
  "val": {"n05": (250, 250, 10), "n04": (10, 250, 250)},
  "test": {"n06": (120, 120, 120), "n07": (250, 10, 250)},
}
PER_CLASS = 4
COUNTS = (3, 2, 2)


def write_csv_fixture(root):
  images = root / "images"
  images.mkdir(parents=True)
  for split, classes in CLASSES.items():
    with open(root / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["filename", "label"])
      for label, colour in classes.items():
        for i in range(PER_CLASS):
          name = f"{label}{i:08d}.jpg"
          # Different sizes: the loader resizes everything to 84x84.
          Image.new("RGB", (60 + 10 * i, 50), colour).save(images / name)
          writer.writerow([name, label])
  return root


@pytest.fixture
def csv_dir(tmp_path):
  return write_csv_fixture(tmp_path / "mini")


def test_csv_loader(csv_dir):
  splits = imdata.load_mini_imagenet_csv(
    csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
  )
  for split, arr in zip(("train", "val", "test"), splits):
    n = len(CLASSES[split])
    assert arr.shape == (n, PER_CLASS, 84, 84, 3)
    assert arr.dtype == np.uint8
    for c, label in enumerate(sorted(CLASSES[split])):  # sorted by label
      mean = arr[c].reshape(-1, 3).mean(axis=0)
      np.testing.assert_allclose(mean, CLASSES[split][label], atol=6)


def test_csv_loader_feeds_the_sampler(csv_dir):
  import jax

  splits = imdata.load_mini_imagenet_csv(
    csv_dir, images_per_class=PER_CLASS, n_classes=None, image_size=8
  )
  task = imdata.sample_tasks(jax.random.key(0), splits.train, 3, 1, 3, 2)
  assert task.support[0].shape == (2, 3, 8, 8, 3)


def test_csv_missing_split_file(csv_dir):
  (csv_dir / "val.csv").unlink()
  with pytest.raises(FileNotFoundError, match="val.csv"):
    imdata.load_mini_imagenet_csv(csv_dir, images_per_class=PER_CLASS)


def test_csv_missing_image_is_found_before_decoding(csv_dir, monkeypatch):
  (csv_dir / "images" / "n0600000002.jpg").unlink()

  def fail(*args, **kwargs):
    raise AssertionError("decoded before checking the files")

  monkeypatch.setattr(Image, "open", fail)
  with pytest.raises(FileNotFoundError, match="n0600000002.jpg.*test.csv"):
    imdata.load_mini_imagenet_csv(
      csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
    )


@pytest.mark.parametrize("image_size", [0, -5, 84.0, "84", True])
def test_csv_bad_image_size_is_named_before_reading(
  csv_dir, monkeypatch, image_size
):
  def fail(*args, **kwargs):
    raise AssertionError("read an image before checking image_size")

  monkeypatch.setattr(Image, "open", fail)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    imdata.load_mini_imagenet_csv(
      csv_dir,
      images_per_class=PER_CLASS,
      n_classes=COUNTS,
      image_size=image_size,
    )


def test_csv_wrong_counts(csv_dir):
  with pytest.raises(
    ValueError, match="class n01 has 4 images, expected images_per_class=600"
  ):
    imdata.load_mini_imagenet_csv(csv_dir)
  with pytest.raises(
    ValueError, match="train.csv: found 3 classes, expected 64"
  ):
    imdata.load_mini_imagenet_csv(csv_dir, images_per_class=PER_CLASS)
  with pytest.raises(ValueError, match="images_per_class"):
    imdata.load_mini_imagenet_csv(csv_dir, images_per_class=0)


@pytest.mark.parametrize(
  "content, reason",
  [
    (b"\x89PNG\r\n\x1a\n\xff\xfe" * 100, "codec can't decode"),
    (b"filename,label\n" + b"a" * 200_000 + b",n01\n", "field limit"),
  ],
)
def test_csv_that_cannot_be_read_is_named(
  csv_dir, tmp_path, capsys, content, reason
):
  """Not text, or a line past the csv module's limit: the file is named."""
  (csv_dir / "train.csv").write_bytes(content)
  with pytest.raises(
    ValueError, match=f"train.csv: not a readable CSV.*{reason}"
  ):
    imdata.load_mini_imagenet_csv(
      csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
    )
  from imaml_jax.train import cli  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / "run"
  argv = ["miniimagenet_5w1s_maml", "--data-dir", str(csv_dir)]
  with pytest.raises(SystemExit) as info:
    cli.train_main([*argv, "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert info.value.code == 2 and "train.csv: not a readable CSV" in err, err
  assert not workdir.exists()


def test_csv_broken_png_is_named(csv_dir):
  """Pillow reports a PNG with a damaged chunk length by a SyntaxError."""
  buf = io.BytesIO()
  Image.new("RGB", (60, 50), (30, 200, 30)).save(buf, format="PNG")
  png = buf.getvalue()
  at = png.index(b"IDAT")
  length = int.from_bytes(png[at - 4 : at], "big")
  broken = png[: at - 4] + (length // 2).to_bytes(4, "big") + png[at:]
  (csv_dir / "images" / "n0100000002.jpg").write_bytes(broken)
  with pytest.raises(ValueError, match="cannot decode .*n0100000002.jpg"):
    imdata.load_mini_imagenet_csv(
      csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
    )


def test_csv_bad_header_and_corrupt_image(csv_dir):
  text = (csv_dir / "train.csv").read_text()
  (csv_dir / "train.csv").write_text(
    text.replace("filename,label", "file,class")
  )
  with pytest.raises(ValueError, match="train.csv: expected the header"):
    imdata.load_mini_imagenet_csv(
      csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
    )
  (csv_dir / "train.csv").write_text(text)
  (csv_dir / "images" / "n0100000001.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="n0100000001.jpg"):
    imdata.load_mini_imagenet_csv(
      csv_dir, images_per_class=PER_CLASS, n_classes=COUNTS
    )


# ----------------------------------------------------------------------------
# The pickled cache.


def write_pickle_fixture(root, protocol, numpy_indices=False):
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  expected = {}
  for split, classes in CLASSES.items():
    n = len(classes) * PER_CLASS
    image_data = rng.integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
    rows = rng.permutation(n)
    class_dict = {}
    for c, label in enumerate(classes):
      idx = rows[c * PER_CLASS : (c + 1) * PER_CLASS]
      class_dict[label] = idx if numpy_indices else [int(i) for i in idx]
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump(
        {"image_data": image_data, "class_dict": class_dict},
        f,
        protocol=protocol,
      )
    expected[split] = np.stack(
      [image_data[np.asarray(class_dict[k])] for k in sorted(class_dict)]
    )
  return expected


@pytest.mark.parametrize(
  "protocol,numpy_indices", [(2, False), (4, True), (5, False)]
)
def test_pickle_loader(tmp_path, protocol, numpy_indices):
  expected = write_pickle_fixture(tmp_path, protocol, numpy_indices)
  splits = imdata.load_mini_imagenet_pickle(
    tmp_path, images_per_class=PER_CLASS, n_classes=COUNTS
  )
  for split, arr in zip(("train", "val", "test"), splits):
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, expected[split])


class _Payload:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_pickle_with_code_is_refused(tmp_path):
  write_pickle_fixture(tmp_path, 4)
  marker = tmp_path / "pwned"
  with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as f:
    pickle.dump(
      {
        "image_data": np.zeros((1, 84, 84, 3), np.uint8),
        "class_dict": {"x": [0]},
        "evil": _Payload(str(marker)),
      },
      f,
    )
  with pytest.raises(ValueError, match="cache-val.pkl.*refusing.*open"):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=PER_CLASS, n_classes=COUNTS
    )
  assert not marker.exists()


@pytest.mark.parametrize(
  "at, value, error",
  [(10, 0x80, "OverflowError"), (9, 0x10, "MemoryError")],
)
def test_pickle_with_a_damaged_frame_length_is_named(
  tmp_path, at, value, error
):
  """Bytes 3..10 of a protocol-4 pickle hold its first frame's length."""
  write_pickle_fixture(tmp_path, 4)
  path = tmp_path / "mini-imagenet-cache-val.pkl"
  raw = bytearray(path.read_bytes())
  assert raw[:3] == b"\x80\x04\x95"  # protocol 4, FRAME
  raw[at] = value  # a length of 2**63 (or 2**52) bytes
  path.write_bytes(bytes(raw))
  with pytest.raises(
    ValueError, match=f"cache-val.pkl: not a readable .*{error}"
  ):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=PER_CLASS, n_classes=COUNTS
    )


def test_pickle_bad_input(tmp_path):
  write_pickle_fixture(tmp_path, 4)
  with pytest.raises(
    ValueError,
    match="cache-train.pkl: class n01 has 4 "
    "images, expected images_per_class=5",
  ):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=5, n_classes=None
    )
  with pytest.raises(ValueError, match="found 3 classes, expected 64"):
    imdata.load_mini_imagenet_pickle(tmp_path, images_per_class=PER_CLASS)
  path = tmp_path / "mini-imagenet-cache-test.pkl"
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match="cache-test.pkl"):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=PER_CLASS, n_classes=COUNTS
    )
  with open(path, "wb") as f:
    pickle.dump(
      {
        "image_data": np.zeros((4, 84, 84, 3), np.float32),
        "class_dict": {"a": [0, 1, 2, 3]},
      },
      f,
    )
  with pytest.raises(ValueError, match="cache-test.pkl: 'image_data' must be"):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=PER_CLASS, n_classes=None
    )
  with open(path, "wb") as f:
    pickle.dump(
      {
        "image_data": np.zeros((4, 84, 84, 3), np.uint8),
        "class_dict": {"a": [0, 1, 2, 9]},
      },
      f,
    )
  with pytest.raises(ValueError, match="class a has indices outside 0..3"):
    imdata.load_mini_imagenet_pickle(
      tmp_path, images_per_class=PER_CLASS, n_classes=None
    )
  path.unlink()
  with pytest.raises(FileNotFoundError, match="cache-test.pkl"):
    imdata.load_mini_imagenet_pickle(tmp_path, images_per_class=PER_CLASS)
