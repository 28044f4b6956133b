"""Verified downloads of the official Omniglot archives."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# MD5 of the official archives, as published with most Omniglot loaders.
OMNIGLOT_MD5 = {
  "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
  "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
_ALGORITHMS = {32: "md5", 40: "sha1", 64: "sha256"}


def _algorithm(checksum: str) -> str:
  algorithm = _ALGORITHMS.get(len(checksum))
  if algorithm is None:
    raise ValueError(
      f"cannot tell the hash algorithm of checksum {checksum!r}: expected "
      "32 (md5), 40 (sha1) or 64 (sha256) hexadecimal digits"
    )
  return algorithm


def file_checksum(path: str | os.PathLike, algorithm: str = "md5") -> str:
  """Hexadecimal digest of a file (``"md5"``, ``"sha1"`` or ``"sha256"``)."""
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _fetch(url: str, dest: Path, checksum: str | None, timeout: float) -> None:
  """Downloads ``url`` into a temporary file next to ``dest``, then renames."""
  fd, tmp = tempfile.mkstemp(
    prefix=f".{dest.name}.", suffix=".part", dir=dest.parent
  )
  try:
    digest = hashlib.new(_algorithm(checksum)) if checksum else None
    received = 0
    with (
      os.fdopen(fd, "wb") as out,
      urllib.request.urlopen(url, timeout=timeout) as response,
    ):
      expected_length = response.headers.get("Content-Length")
      for block in iter(lambda: response.read(1 << 16), b""):
        out.write(block)
        received += len(block)
        if digest is not None:
          digest.update(block)
      out.flush()
      os.fsync(out.fileno())
    if expected_length is not None and received != int(expected_length):
      raise OSError(
        f"download of {dest.name} from {url} is truncated: "
        f"received {received} of {expected_length} bytes; the "
        "download was deleted"
      )
    if digest is not None and digest.hexdigest() != checksum.lower():
      raise ValueError(
        f"checksum mismatch for {dest.name} (from {url}): expected "
        f"{_algorithm(checksum)} {checksum.lower()}, got "
        f"{digest.hexdigest()}; the download was deleted"
      )
    os.replace(tmp, dest)
  except http.client.HTTPException as e:
    _remove(tmp)
    raise OSError(f"download of {dest.name} from {url} failed: {e!r}") from e
  except BaseException:
    _remove(tmp)
    raise


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def download_omniglot(
  data_dir: str | os.PathLike,
  *,
  base_url: str = OMNIGLOT_URL,
  checksums: Mapping[str, str | None] | None = None,
  timeout: float = 60.0,
) -> tuple[Path, ...]:
  """Downloads ``images_background.zip`` and ``images_evaluation.zip``.

  Each archive is streamed into a temporary file in ``data_dir``, its checksum
  is verified, and only then is it renamed into place. On a mismatch (or an
  interrupted or truncated transfer) the temporary file is deleted and an
  error names the file and both checksums. An archive already present with
  the right checksum is not fetched again.

  Checksums are hexadecimal digests; the algorithm follows from the length
  (32 digits: MD5, 40: SHA-1, 64: SHA-256). The defaults are the MD5s of the
  official archives. A checksum of ``None`` skips verification for that file.

  Args:
    data_dir: destination directory (created if missing).
    base_url: URL prefix the archive names are appended to.
    checksums: archive file name -> checksum; defaults to
      :data:`OMNIGLOT_MD5`.
    timeout: socket timeout in seconds.

  Returns:
    The paths of the two archives.

  Raises:
    ValueError: a checksum does not match (nothing is left behind).
    OSError: the transfer failed or was truncated (nothing is left behind).

  Example:
    >>> download_omniglot("data/omniglot")  # doctest: +SKIP
  """
  if checksums is None:
    checksums = OMNIGLOT_MD5
  data_dir = Path(data_dir).expanduser()
  names = list(OMNIGLOT_MD5)
  unknown = [n for n in names if n not in checksums]
  if unknown:
    raise ValueError(
      f"no checksum given for {', '.join(unknown)} (pass None "
      "to skip verification explicitly)"
    )
  for name in names:
    if checksums[name] is not None:
      _algorithm(checksums[name])
  data_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for name in names:
    dest = data_dir / name
    checksum = checksums[name]
    present = dest.is_file() and (
      checksum is None
      or file_checksum(dest, _algorithm(checksum)) == checksum.lower()
    )
    if not present:
      url = urllib.parse.urljoin(base_url.rstrip("/") + "/", name)
      _fetch(url, dest, checksum, timeout)
    paths.append(dest)
  return tuple(paths)
