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
