"""Checkpoint files and the metrics log (no training here)."""

import collections
import os

import numpy as np
import pytest

from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import metrics_log

State = collections.namedtuple("State", ["params", "step"])


def _tree():
  return {
    "state": State(
      {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.zeros(3, np.float32),
      },
      np.int32(4),
    ),
    "key": np.array([1, 2], np.uint32),
    "config": "{}",
  }


def test_round_trip(tmp_path):
  path = ckpt_lib.save(tmp_path, 4, _tree())
  step, raw = ckpt_lib.load(path)
  assert step == 4 and raw["config"] == "{}"
  template = _tree()["state"]
  restored = ckpt_lib.restore_into(template, raw["state"])
  assert isinstance(restored, State)
  np.testing.assert_array_equal(restored.params["w"], template.params["w"])
  assert restored.step == 4


def test_keeps_newest_and_ignores_temporaries(tmp_path):
  for step in (10, 20, 30, 40):
    ckpt_lib.save(tmp_path, step, _tree(), keep=2)
  (tmp_path / ".tmp-checkpoint_stale").write_bytes(b"partial")
  assert [s for s, _ in ckpt_lib.list_checkpoints(tmp_path)] == [30, 40]
  assert (
    ckpt_lib.latest_checkpoint(tmp_path).name == "checkpoint_000000040.ckpt"
  )
  assert len(ckpt_lib.remove_stale_temporaries(tmp_path)) == 1


def test_truncated_file_is_detected(tmp_path):
  path = ckpt_lib.save(tmp_path, 1, _tree())
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 10])
  with pytest.raises(ckpt_lib.CheckpointError, match="truncated"):
    ckpt_lib.load(path)
  path.write_bytes(data[:20])
  with pytest.raises(ckpt_lib.CheckpointError, match="not an imaml_jax"):
    ckpt_lib.load(path)


def test_flipped_byte_is_detected(tmp_path):
  path = ckpt_lib.save(tmp_path, 1, _tree())
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ckpt_lib.CheckpointError, match="SHA-256"):
    ckpt_lib.load(path)


def test_wrong_shapes_are_reported(tmp_path):
  path = ckpt_lib.save(tmp_path, 1, _tree())
  _, raw = ckpt_lib.load(path)
  template = State(
    {"w": np.zeros((3, 3), np.float32), "b": np.zeros(3, np.float32)},
    np.int32(0),
  )
  with pytest.raises(ckpt_lib.CheckpointError, match=r"'w'.*\(2, 3\)"):
    ckpt_lib.restore_into(template, raw["state"])
  template = State({"w": np.zeros((2, 3), np.float32)}, np.int32(0))
  with pytest.raises(ckpt_lib.CheckpointError):
    ckpt_lib.restore_into(template, raw["state"])


def test_metrics_log_truncates_and_drops_partial_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = metrics_log.MetricsLog(path)
  for step in (10, 20, 30):
    log.write({"step": step, "split": "train", "loss_after": 1.0})
  log.close()
  with open(path, "a") as f:
    f.write('{"step": 40, "spl')  # A line cut by a kill.
  log.truncate(20)
  assert [r["step"] for r in metrics_log.read_records(path)] == [10, 20]
  log.write({"step": 30, "split": "train"})
  log.close()
  assert [r["step"] for r in metrics_log.read_records(path)] == [10, 20, 30]


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    ckpt_lib.write_atomic(tmp_path / "results.json", b"{}")
  finally:
    os.umask(old)
  assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "results.json").read_bytes() == b"{}"
