"""Bad input to the commands: exit code 2, a clear message, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from imaml_jax.train import cli
from imaml_jax.train import config as config_lib


def _exit_code(main, argv, capsys):
  with pytest.raises(SystemExit) as info:
    main(argv)
  return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
  "argv,message",
  [
    (["nope"], "unknown config 'nope'"),
    (["sinusoid", "--set", "meta_stepz=3"], "Did you mean 'meta_steps'"),
    (["sinusoid", "--set", "meta_steps=many"], "meta_steps expects int"),
    (["sinusoid", "--set", "maml_remat=yes"], "true/false/1/0"),
    (["sinusoid", "--set", "meta_lr=-1"], "meta_lr must be > 0"),
    (["sinusoid", "--set", "meta_steps"], "key=value"),
    (
      ["omniglot_5w1s_imaml_gd", "--data-dir", "/nonexistent/omniglot"],
      "does not exist",
    ),
    (["sinusoid", "--devices", "0"], "--devices must be >= 1; got 0"),
    (["sinusoid", "--devices", "1000"], "asked for 1000 devices"),
    (
      ["sinusoid", "--num-processes", "2", "--process-id", "0"],
      "--num-processes and --process-id given without --coordinator",
    ),
    (
      ["sinusoid", "--coordinator", "localhost:1234", "--num-processes", "2"],
      "--coordinator localhost:1234 needs --process-id too",
    ),
    (
      ["sinusoid", "--coordinator", "auto", "--process-id", "1"],
      "--coordinator auto detects the cluster; drop --process-id",
    ),
    (
      [
        "sinusoid",
        "--coordinator",
        "localhost:1234",
        "--num-processes",
        "2",
        "--process-id",
        "2",
      ],
      "--process-id must be in 0..1; got 2",
    ),
    (
      [
        "sinusoid",
        "--coordinator",
        "localhost:1234",
        "--num-processes",
        "0",
        "--process-id",
        "0",
      ],
      "--num-processes must be >= 1",
    ),
  ],
)
def test_bad_train_input(tmp_path, capsys, argv, message):
  workdir = tmp_path / "run"
  code, err = _exit_code(
    cli.train_main, argv + ["--workdir", str(workdir)], capsys
  )
  assert code == 2
  assert message in err
  assert not workdir.exists()


def test_unknown_config_lists_the_valid_ones(tmp_path, capsys):
  code, err = _exit_code(
    cli.train_main, ["nope", "--workdir", str(tmp_path / "run")], capsys
  )
  assert code == 2
  assert "sinusoid" in err and "omniglot_20w5s_reptile" in err


def test_data_dir_without_archives(tmp_path, capsys):
  empty = tmp_path / "omniglot"
  empty.mkdir()
  workdir = tmp_path / "run"
  code, err = _exit_code(
    cli.train_main,
    [
      "omniglot_5w1s_imaml_gd",
      "--workdir",
      str(workdir),
      "--data-dir",
      str(empty),
    ],
    capsys,
  )
  assert code == 2 and "images_background.zip" in err
  assert not workdir.exists()


def test_data_dir_from_environment(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("IMAML_OMNIGLOT_DIR", raising=False)
  workdir = tmp_path / "run"
  code, err = _exit_code(
    cli.train_main,
    ["omniglot_5w1s_imaml_gd", "--workdir", str(workdir)],
    capsys,
  )
  assert code == 2 and "IMAML_OMNIGLOT_DIR" in err
  monkeypatch.setenv("IMAML_OMNIGLOT_DIR", str(tmp_path / "missing"))
  code, err = _exit_code(
    cli.train_main,
    ["omniglot_5w1s_imaml_gd", "--workdir", str(workdir)],
    capsys,
  )
  assert code == 2 and "missing" in err
  monkeypatch.setenv("IMAML_MINI_IMAGENET_DIR", str(tmp_path))
  code, err = _exit_code(
    cli.train_main,
    ["miniimagenet_5w1s_maml", "--workdir", str(workdir)],
    capsys,
  )
  assert code == 2 and "mini-ImageNet" in err
  assert not workdir.exists()


def test_workdir_of_another_config_is_refused(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  stored = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), ["meta_steps=7"]
  )
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(stored)))
  before = sorted(os.listdir(workdir))
  code, err = _exit_code(
    cli.train_main,
    ["sinusoid", "--workdir", str(workdir), "--set", "meta_steps=8"],
    capsys,
  )
  assert code == 2
  assert "meta_steps: stored 7, requested 8" in err
  code, err = _exit_code(
    cli.train_main, ["sinusoid_maml", "--workdir", str(workdir)], capsys
  )
  assert code == 2 and "'sinusoid'" in err
  assert sorted(os.listdir(workdir)) == before


def _stored_run(workdir, *overrides):
  """A work directory holding the config of ``sinusoid`` with ``overrides``."""
  workdir.mkdir()
  stored = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), list(overrides)
  )
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(stored)))


def _log(workdir, *steps):
  lines = [json.dumps({"step": step, "loss_after": 0.5}) for step in steps]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
  ("files", "message"),
  [
    ({"results.json": "{}"}, "holds a run's records (results.json)"),
    ({"eval_protocol=paper.json": "{}"}, "(eval_protocol=paper.json)"),
    ({}, "(metrics.jsonl up to step 20)"),
  ],
)
def test_a_run_whose_checkpoints_are_gone_is_not_overwritten(
  tmp_path, capsys, files, message
):
  """Without its checkpoints a run would start again from step 0 and
  overwrite its records: refused, naming them, with nothing changed."""
  workdir = tmp_path / "run"
  overrides = ["meta_steps=30", "checkpoint_every=10", "log_every=5"]
  _stored_run(workdir, *overrides)
  _log(workdir, 5, 10, 15, 20)
  for name, text in files.items():
    (workdir / name).write_text(text)
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  code, err = _exit_code(
    cli.train_main,
    ["sinusoid", "--workdir", str(workdir), "--set", *overrides],
    capsys,
  )
  assert code == 2 and message in err and "none of its checkpoints" in err
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_files_of_something_else_are_not_overwritten(tmp_path, capsys):
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"epoch": 1}\n')
  (workdir / "results.json").write_text('{"my": "numbers"}')
  code, err = _exit_code(
    cli.train_main, ["sinusoid", "--workdir", str(workdir)], capsys
  )
  assert code == 2
  assert "holds results.json, metrics.jsonl but no config.json" in err
  assert (workdir / "results.json").read_text() == '{"my": "numbers"}'
  assert sorted(p.name for p in workdir.iterdir()) == [
    "metrics.jsonl",
    "results.json",
  ]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
  """Records before the first checkpoint step are recomputed as they were,
  so such a run (and a branch logged from its source's step) restarts."""
  from imaml_jax.train import workdir as workdir_lib

  overrides = ["meta_steps=30", "checkpoint_every=10", "log_every=5"]
  config = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), overrides
  )
  workdir = tmp_path / "run"
  _stored_run(workdir, *overrides)
  _log(workdir, 5)
  assert workdir_lib.check_workdir(config, workdir) is None
  _log(workdir, 5, 10)  # Killed while checkpointing step 10.
  assert workdir_lib.check_workdir(config, workdir) is None
  # A branch from step 500 of its source, logged up to 505.
  (workdir / "init_from.json").write_text(
    json.dumps({"params": "state", "step": 500})
  )
  _log(workdir, 500, 505)
  assert workdir_lib.check_workdir(config, workdir) is None
  # Killed while validating or checkpointing at its first checkpoint step.
  _log(workdir, 500, 505, 510)
  assert workdir_lib.check_workdir(config, workdir) is None
  _log(workdir, 500, 505, 510, 515)
  with pytest.raises(workdir_lib.WorkdirError, match="up to step 515"):
    workdir_lib.check_workdir(config, workdir)
  # Killed before the branch recorded its start: its log is the source's.
  (workdir / "init_from.json").unlink()
  branch = config_lib.apply_overrides(
    config, ["init_from=elsewhere", "init_params=state"]
  )
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(branch)))
  assert workdir_lib.check_workdir(branch, workdir) is None


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (["n_way=500"], "n_way=500 is more than the 400 classes of the val split"),
    (
      ["n_way=2000", "val_every=0"],
      "n_way=2000 is more than the 1692 classes of the test split",
    ),
    (["n_way=5000"], "n_way=5000 is more than the 4400 classes of the train"),
  ],
)
def test_an_impossible_n_way_is_refused_before_training(
  tmp_path, capsys, overrides, message
):
  """Checked once the splits are loaded: nothing compiled, nothing written."""
  if not os.environ.get("IMAML_OMNIGLOT_DIR"):
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  workdir = tmp_path / "run"
  code, err = _exit_code(
    cli.train_main,
    ["omniglot_5w1s_maml", "--workdir", str(workdir), "--no-progress"]
    + ["--set", *overrides],
    capsys,
  )
  assert code == 2 and message in err, err
  assert not workdir.exists()


def test_eval_refuses_an_n_way_larger_than_the_split_it_draws_from(
  tmp_path, capsys
):
  """A run that never validated holds more classes than --split val has."""
  if not os.environ.get("IMAML_OMNIGLOT_DIR"):
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  workdir = tmp_path / "run"
  tiny = [
    "n_way=101",
    "q_query=1",
    "class_rotations=per_task",  # 100 validation characters
    "val_every=0",
    "meta_steps=1",
    "meta_batch=1",
    "inner_steps=1",
    "test_tasks=1",
    "eval_chunk=1",
  ]
  argv = ["omniglot_5w1s_fomaml", "--workdir", str(workdir), "--no-progress"]
  assert cli.train_main([*argv, "--set", *tiny]) == 0
  capsys.readouterr()
  code, err = _exit_code(
    cli.eval_main,
    ["--workdir", str(workdir), "--split", "val", "--no-progress"],
    capsys,
  )
  assert code == 2, err
  assert "n_way=101 is more than the 100 classes of the val split" in err
  assert not (workdir / "eval_val.json").exists()


def test_eval_without_a_run(tmp_path, capsys):
  code, err = _exit_code(
    cli.eval_main, ["--workdir", str(tmp_path / "x")], capsys
  )
  assert code == 2 and "holds no run" in err


def test_list(capsys):
  assert cli.train_main(["--list"]) == 0
  assert "omniglot_5w1s_imaml_gd" in capsys.readouterr().out


def test_module_entry_point_subprocess(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "imaml_jax",
      "train",
      "omniglot_5w1s_mamll",
      "--workdir",
      str(workdir),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr
  assert "Did you mean 'omniglot_5w1s_maml'" in proc.stderr
  assert not workdir.exists()
  proc = subprocess.run(
    [sys.executable, "-m", "imaml_jax", "fly"],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2 and "train or eval" in proc.stderr


def test_compile_cache_default_and_respects_existing(monkeypatch, tmp_path):
  import jax

  old = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("IMAML_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.enable_compile_cache(None) == str(tmp_path / "cache" / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache/xla")
    # A cache configured already (by the user or a test) is kept.
    assert cli.enable_compile_cache(str(tmp_path / "other")) == str(
      tmp_path / "cache" / "xla"
    )
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
