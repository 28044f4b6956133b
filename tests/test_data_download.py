"""Tests of the verified Omniglot download against a local HTTP server."""

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from imaml_jax import data as imdata

ARCHIVES = ("images_background.zip", "images_evaluation.zip")
ENV = "IMAML_OMNIGLOT_DIR"
REPO = Path(__file__).resolve().parents[1]


def real_omniglot_dir() -> Path:
  """``$IMAML_OMNIGLOT_DIR``: skip when unset, fail when set but missing."""
  value = os.environ.get(ENV)
  if not value:
    pytest.skip(f"{ENV} is not set")
  path = Path(value)
  if not path.is_absolute() and not path.exists():
    path = REPO / path
  missing = [n for n in ARCHIVES if not (path / n).is_file()]
  if missing:
    pytest.fail(f"{ENV}={value} is set but {path} lacks {missing}")
  return path


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves files from ``directory``; ``mode`` damages the response."""

  mode = "ok"
  requests: list = []

  def log_message(self, *args):  # keep the test output quiet
    pass

  def do_GET(self):
    type(self).requests.append(self.path)
    path = Path(self.directory) / self.path.lstrip("/")
    if not path.is_file():
      self.send_error(404)
      return
    body = path.read_bytes()
    length = len(body)
    if self.mode == "corrupt":
      body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
    elif self.mode == "short":  # a truncated file served as complete
      body = body[: len(body) // 2]
      length = len(body)
    elif self.mode == "cut":  # the connection drops mid-transfer
      body = body[: len(body) // 2]
    self.send_response(200)
    self.send_header("Content-Type", "application/zip")
    self.send_header("Content-Length", str(length))
    self.end_headers()
    self.wfile.write(body)


@pytest.fixture(scope="module")
def served():
  """A server on 127.0.0.1 (free port) serving the real archives."""
  directory = real_omniglot_dir()
  handler = functools.partial(_Handler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  checksums = {
    "md5": {n: imdata.file_checksum(directory / n, "md5") for n in ARCHIVES},
    "sha256": {
      n: imdata.file_checksum(directory / n, "sha256") for n in ARCHIVES
    },
  }
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/", directory, checksums
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _reset_handler():
  _Handler.mode = "ok"
  _Handler.requests = []
  yield
  _Handler.mode = "ok"


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_download_verifies_and_moves_into_place(served, tmp_path, algorithm):
  url, directory, checksums = served
  dest = tmp_path / "new" / "omniglot"
  paths = imdata.download_omniglot(
    dest, base_url=url, checksums=checksums[algorithm]
  )
  assert [p.name for p in paths] == list(ARCHIVES)
  assert sorted(os.listdir(dest)) == sorted(ARCHIVES)  # no temporary files
  for name in ARCHIVES:
    assert (dest / name).read_bytes() == (directory / name).read_bytes()
  assert len(_Handler.requests) == 2
  # Present and valid: not fetched again.
  imdata.download_omniglot(dest, base_url=url, checksums=checksums[algorithm])
  assert len(_Handler.requests) == 2


def test_downloaded_archives_load(served, tmp_path):
  url, _, checksums = served
  dest = tmp_path / "omniglot"
  imdata.download_omniglot(dest, base_url=url, checksums=checksums["sha256"])
  # Opening and indexing both archives is cheap; decoding is covered elsewhere.
  from imaml_jax.data import _omniglot

  for name, top in zip(ARCHIVES, _omniglot.OMNIGLOT_ARCHIVES):
    zf, index = _omniglot._open_archive(dest / name, top)
    zf.close()
    assert (
      len(index) == {"images_background": 964, "images_evaluation": 659}[top]
    )


@pytest.mark.parametrize("mode", ["corrupt", "short"])
def test_damaged_download_is_detected_and_removed(served, tmp_path, mode):
  url, _, checksums = served
  _Handler.mode = mode
  dest = tmp_path / "omniglot"
  expected = checksums["sha256"]["images_background.zip"]
  with pytest.raises(ValueError) as info:
    imdata.download_omniglot(dest, base_url=url, checksums=checksums["sha256"])
  message = str(info.value)
  assert "images_background.zip" in message
  assert expected in message
  actual = message.split("got ")[1].split(";")[0]
  assert len(actual) == 64 and actual != expected
  assert os.listdir(dest) == []


def test_connection_cut_is_detected_and_removed(served, tmp_path):
  url, _, checksums = served
  _Handler.mode = "cut"
  dest = tmp_path / "omniglot"
  with pytest.raises(OSError, match="images_background.zip"):
    imdata.download_omniglot(dest, base_url=url, checksums=checksums["md5"])
  assert os.listdir(dest) == []


def test_official_checksums_reject_other_archives(served, tmp_path):
  """The rebuilt local zips differ from the official ones: MD5 mismatch."""
  url, _, checksums = served
  dest = tmp_path / "omniglot"
  if checksums["md5"] == imdata.OMNIGLOT_MD5:
    pytest.skip("the local archives are the official ones")
  with pytest.raises(ValueError, match=imdata.OMNIGLOT_MD5[ARCHIVES[0]]):
    imdata.download_omniglot(dest, base_url=url)
  assert os.listdir(dest) == []


def test_http_error_leaves_nothing(served, tmp_path):
  url, _, checksums = served
  dest = tmp_path / "omniglot"
  with pytest.raises(OSError):
    imdata.download_omniglot(
      dest, base_url=url + "missing/", checksums=checksums["md5"]
    )
  assert os.listdir(dest) == []


def test_bad_checksum_arguments(tmp_path):
  with pytest.raises(ValueError, match="images_evaluation.zip"):
    imdata.download_omniglot(tmp_path, checksums={ARCHIVES[0]: "0" * 32})
  with pytest.raises(ValueError, match="hash algorithm"):
    imdata.download_omniglot(tmp_path, checksums={n: "abc" for n in ARCHIVES})
  assert os.listdir(tmp_path) == []
