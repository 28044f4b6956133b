"""Named configs, overrides and their parsing (no training here)."""

import dataclasses

import pytest

from imaml_jax import models
from imaml_jax.train import config as config_lib


def test_one_config_per_table_cell():
  names = set(config_lib.config_names())
  for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
    for algo in ("imaml_gd", "imaml_hf", "maml", "fomaml", "reptile"):
      assert f"omniglot_{setting}_{algo}" in names
  for algo in ("imaml_gd", "imaml_hf", "maml", "fomaml", "reptile"):
    assert f"miniimagenet_5w1s_{algo}" in names
  assert "sinusoid" in names


@pytest.mark.parametrize(
  "name,n_way,k_shot,steps",
  [
    ("omniglot_5w1s_imaml_gd", 5, 1, 16),
    ("omniglot_5w5s_imaml_gd", 5, 5, 16),
    ("omniglot_20w1s_imaml_gd", 20, 1, 25),
    ("omniglot_20w5s_imaml_gd", 20, 5, 25),
  ],
)
def test_paper_settings_for_imaml_gd(name, n_way, k_shot, steps):
  cfg = config_lib.get_config(name)
  assert (cfg.n_way, cfg.k_shot, cfg.inner_steps) == (n_way, k_shot, steps)
  assert (cfg.algorithm, cfg.inner, cfg.lam, cfg.cg_steps) == (
    "imaml",
    "gd",
    2.0,
    5,
  )
  assert (cfg.optimizer, cfg.meta_lr, cfg.meta_batch) == ("adam", 1e-3, 32)
  # Adam's eps of the authors' code: what kept 20,000 constant-rate steps
  # from collapsing (the module docstring).
  assert cfg.adam_eps == 1e-3 and cfg.lr_schedule == "constant"
  # 0.05: gradient descent on the proximal objective is unstable at 0.1
  # (see the module docstring of imaml_jax.train.config).
  assert cfg.inner_lr == 0.05 and cfg.q_query == 15
  assert cfg.meta_steps >= 20_000 and cfg.test_tasks == 600
  assert cfg.conv == models.DEFAULT_CONV


def test_baseline_settings():
  # MAML's stated 0.4 (5-way) and 0.1 (20-way) on the mean cross-entropy
  # (its code's N times larger step: the module docstring of config).
  maml5 = config_lib.get_config("omniglot_5w1s_maml")
  assert (maml5.inner_steps, maml5.inner_lr, maml5.eval_inner_steps) == (
    1,
    0.4,
    3,
  )
  maml20 = config_lib.get_config("omniglot_20w5s_fomaml")
  assert (
    maml20.algorithm,
    maml20.inner_steps,
    maml20.inner_lr,
    maml20.meta_batch,
  ) == ("fomaml", 5, 0.1, 16)
  for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
    lr = 0.4 if setting.startswith("5w") else 0.1
    for algo in ("maml", "fomaml"):
      assert config_lib.get_config(f"omniglot_{setting}_{algo}").inner_lr == lr
  assert config_lib.get_config("miniimagenet_5w1s_maml").inner_lr == 0.01
  hf = config_lib.get_config("omniglot_5w1s_imaml_hf")
  assert (hf.inner, hf.inner_steps, hf.hf_cg_steps, hf.adam_eps) == (
    "hessian_free",
    20,
    5,
    1e-3,
  )
  assert maml5.adam_eps == maml20.adam_eps == 1e-8  # optax's default.
  rep = config_lib.get_config("miniimagenet_5w1s_reptile")
  assert (rep.optimizer, rep.lr_schedule, rep.eval_inner_steps) == (
    "sgd",
    "linear",
    50,
  )


@pytest.mark.parametrize(
  "name, steps, lr, meta_steps",
  [
    ("omniglot_5w1s_reptile", 5, 1e-3, 100_000),
    ("omniglot_5w5s_reptile", 5, 1e-3, 100_000),
    ("omniglot_20w1s_reptile", 10, 5e-4, 200_000),
    ("omniglot_20w5s_reptile", 10, 5e-4, 200_000),
    ("miniimagenet_5w1s_reptile", 8, 1e-3, 100_000),
  ],
)
def test_reptile_configs_follow_the_reptile_commands(
  name, steps, lr, meta_steps
):
  from imaml_jax.train import experiment

  cfg = config_lib.get_config(name)
  assert (
    cfg.inner,
    cfg.inner_steps,
    cfg.inner_lr,
    cfg.eval_inner_steps,
    cfg.meta_batch,
    cfg.meta_lr,
    cfg.meta_steps,
  ) == ("adam", steps, lr, 50, 5, 1.0, meta_steps)
  shots, batch = (
    (15, 10) if name.startswith("mini") else (10, 20 if "20w" in name else 10)
  )
  assert (cfg.reptile_train_shots, cfg.reptile_inner_batch) == (shots, batch)
  assert experiment.inner_solver(cfg, steps).name == (
    f"adam(steps={steps}, lr={lr}, b1=0.0, b2=0.999)"
  )
  assert experiment.algorithm(cfg).name == (
    f"reptile(adam(steps={steps}, lr={lr}, b1=0.0, b2=0.999), minibatches)"
  )
  assert experiment.algorithm(cfg, evaluation=True).name == (
    f"reptile(adam(steps=50, lr={lr}, b1=0.0, b2=0.999))"
  )


def test_reptile_training_tasks_are_its_minibatches():
  import jax
  import numpy as np

  import imaml_jax as im
  from imaml_jax.train import experiment

  cfg = config_lib.apply_overrides(
    config_lib.get_config("omniglot_5w1s_reptile"), ["meta_batch=2"]
  )
  images = np.arange(6 * 20 * 4, dtype=np.uint8).reshape(6, 20, 2, 2, 1)
  tasks = experiment.sampler(cfg)(jax.random.key(0), images)
  assert tasks.support[0].shape == (2, 5, 10, 2, 2, 1)
  assert tasks.query[0].shape == (2, 75, 2, 2, 1)
  # The sampler of a device mesh gives the same mini-batches.
  from imaml_jax.train import steps

  exp = experiment.build(cfg, experiment.Data(images, images, images))
  sharded = jax.jit(steps.task_sampler(exp, im.task_mesh(1)))(
    jax.random.key(0), exp.data.train
  )
  np.testing.assert_array_equal(sharded.support[0], tasks.support[0])
  np.testing.assert_array_equal(sharded.support[1], tasks.support[1])
  plain = config_lib.apply_overrides(
    cfg, ["reptile_train_shots=0", "reptile_inner_batch=0"]
  )
  assert experiment.sampler(plain)(jax.random.key(0), images).support[
    0
  ].shape == (2, 5, 2, 2, 1)


@pytest.mark.parametrize(
  "name, overrides, message",
  [
    (
      "omniglot_5w1s_maml",
      ["reptile_train_shots=10", "reptile_inner_batch=10"],
      "apply to algorithm='reptile' on Omniglot or mini-ImageNet",
    ),
    ("omniglot_5w1s_reptile", ["reptile_inner_batch=0"], "go together"),
    (
      "omniglot_5w1s_reptile",
      ["inner=nesterov"],
      "need inner='adam' or inner='gd' without inner_backtrack",
    ),
  ],
)
def test_reptile_minibatch_options_are_checked(name, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(config_lib.get_config(name), overrides)


def test_reptile_train_shots_must_fit_a_training_task_not_a_test_task():
  cfg = config_lib.get_config("omniglot_5w1s_reptile")
  # One query image per class is a valid test (the authors' protocol) ...
  test = config_lib.apply_overrides(cfg, ["q_query=1"])
  # ... but not a training task for 10 images per class.
  with pytest.raises(
    config_lib.ConfigError,
    match=(
      "reptile_train_shots = 10 is more than a task's k_shot \\+ q_query "
      "= 1 \\+ 1"
    ),
  ):
    config_lib.check_training(test)
  config_lib.check_training(cfg)


@pytest.mark.parametrize(
  "setting, steps", [("5w1s", 16), ("5w5s", 16), ("20w1s", 25), ("20w5s", 25)]
)
def test_authors_recipe_configs(setting, steps):
  cfg = config_lib.get_config(f"omniglot_{setting}_imaml_gd_authors")
  assert config_lib.validate(cfg) is cfg
  assert (
    cfg.algorithm,
    cfg.inner,
    cfg.inner_steps,
    cfg.inner_lr,
    cfg.inner_backtrack,
  ) == ("imaml", "gd_then_pull_back", steps, 0.1, False)
  assert (cfg.lam, cfg.cg_steps, cfg.cg_damping, cfg.lam_damping) == (
    2.0,
    5,
    1.0,
    10.0,
  )
  assert (
    cfg.optimizer,
    cfg.meta_lr,
    cfg.adam_eps,
    cfg.lr_schedule,
    cfg.meta_batch,
    cfg.meta_steps,
  ) == ("adam", 1e-3, 1e-3, "constant", 32, 20_000)
  paper = config_lib.get_config(f"omniglot_{setting}_imaml_gd")
  assert (cfg.n_way, cfg.k_shot, cfg.q_query) == (
    paper.n_way,
    paper.k_shot,
    paper.q_query,
  )
  assert (paper.cg_damping, paper.lam_damping) == (0.0, 0.0)


def test_authors_recipe_is_wired_into_the_experiment():
  from imaml_jax.train import experiment

  cfg = config_lib.get_config("omniglot_20w1s_imaml_gd_authors")
  assert experiment.inner_solver(cfg, 25).name == (
    "gd_then_pull_back(steps=25, lr=0.1)"
  )
  name = experiment.algorithm(cfg).name
  assert "gd_then_pull_back" in name
  assert name.endswith("damping=1.0, lam_damping=10.0)")
  paper = experiment.algorithm(config_lib.get_config("omniglot_5w1s_imaml_gd"))
  assert "damping" not in paper.name


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    config_lib.get_config("sinusoid").meta_steps = 3


def test_overrides_are_parsed_by_field_type():
  conv = models.CONV_FORMULATIONS[-1]
  cfg = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"),
    [
      "meta_steps=1_000",
      "meta_lr=3e-4",
      "maml_remat=TRUE",
      f"conv={conv}",
      "val_every=0",
    ],
  )
  assert cfg.meta_steps == 1000 and cfg.meta_lr == 3e-4
  assert cfg.maml_remat is True and cfg.conv == conv and cfg.val_every == 0
  assert config_lib.parse_value("maml_remat", "0") is False


@pytest.mark.parametrize(
  "override,message",
  [
    ("meta_stepz=5", "Did you mean 'meta_steps'"),
    ("meta_steps=abc", "meta_steps expects int"),
    ("meta_steps=2.5", "meta_steps expects int"),
    ("meta_lr=fast", "meta_lr expects float"),
    ("maml_remat=yes", "true/false/1/0"),
    ("meta_batch=0", "meta_batch must be >= 1"),
    ("algorithm=mamll", "algorithm must be one of"),
    ("conv=fft", "conv must be one of"),
    ("meta_steps", "key=value"),
    ("name=other", "name cannot be overridden"),
    ("cg_damping=-1", r"cg_damping must be >= 0 and finite; got -1.0"),
    ("lam_damping=-10", r"lam_damping must be >= 0 and finite; got -10.0"),
    ("lam_damping=nan", r"lam_damping must be >= 0 and finite; got nan"),
    ("lam_damping=inf", r"lam_damping must be >= 0 and finite; got inf"),
    ("weight_decay=-0.1", r"weight_decay must be >= 0 and finite; got -0.1"),
    ("lam=inf", r"lam must be > 0 and finite; got inf"),
    ("inner_lr=inf", r"inner_lr must be > 0 and finite; got inf"),
    ("meta_lr=-inf", r"meta_lr must be > 0 and finite; got -inf"),
    ("adam_eps=nan", r"adam_eps must be > 0 and finite; got nan"),
    ("split_seed=-1", r"split_seed must be >= 0; got -1"),
    ("test_seed=-3", r"test_seed must be >= 0; got -3"),
    ("inner=gd_then_pull_backk", "inner must be one of"),
    ("class_rotations=per_class", "class_rotations must be one of"),
    ("class_rotations=per_task", "applies to Omniglot only"),
  ],
)
def test_bad_overrides(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(config_lib.get_config("sinusoid"), [override])


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ["algorithm=maml", "cg_damping=0", "lam_damping=0"],
      "inner='gd_then_pull_back' applies to algorithm='imaml' only",
    ),
    (
      ["algorithm=reptile", "inner=gd"],
      "cg_damping and lam_damping apply to algorithm='imaml' only",
    ),
  ],
)
def test_authors_options_are_refused_outside_imaml(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(
      config_lib.get_config("omniglot_5w1s_imaml_gd_authors"), overrides
    )


def test_another_inner_solver_on_a_checked_gd_config_names_the_remedy():
  """The iMAML-GD configs check their GD steps; switching the inner solver
  alone is refused with the override that completes it, and with that
  override it applies."""
  config = config_lib.get_config("omniglot_5w1s_imaml_gd")
  change = ["inner=gd_then_pull_back", "inner_lr=0.1"]
  with pytest.raises(config_lib.ConfigError, match="add inner_backtrack=false"):
    config_lib.apply_overrides(config, change)
  changed = config_lib.apply_overrides(
    config, [*change, "inner_backtrack=false"]
  )
  assert changed.inner == "gd_then_pull_back" and not changed.inner_backtrack


@pytest.mark.parametrize(
  "name, overrides, message",
  [
    (
      "omniglot_5w1s_imaml_gd",
      ["adapt_norm=false"],
      "adapt_norm=False applies to algorithm='maml' or 'fomaml' only",
    ),
    (
      "omniglot_5w1s_reptile",
      ["adapt_norm=false"],
      "adapt_norm=False applies to algorithm='maml' or 'fomaml' only",
    ),
    ("sinusoid_maml", ["adapt_norm=false"], "sinusoid network has none"),
    ("sinusoid", ["network=maml"], "sinusoid dataset has one network only"),
    ("omniglot_5w1s_maml", ["network=vgg"], "network must be one of"),
  ],
)
def test_maml_reference_network_options_are_refused_where_meaningless(
  name, overrides, message
):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(config_lib.get_config(name), overrides)


def test_maml_reference_network_is_wired_into_the_experiment():
  from imaml_jax.train import experiment

  cfg = config_lib.apply_overrides(
    config_lib.get_config("omniglot_5w1s_maml"),
    ["network=maml", "adapt_norm=false"],
  )
  net, _ = experiment.network(cfg)
  assert (net.norm_scale, net.global_pool, net.norm_epsilon) == (
    False,
    True,
    1e-3,
  )
  assert experiment.algorithm(cfg).name.endswith("adapts=adapt_all_but_norm)")
  default = config_lib.get_config("omniglot_5w1s_maml")
  assert (default.network, default.adapt_norm) == ("standard", True)
  assert experiment.network(default)[0].norm_scale
  assert "adapts" not in experiment.algorithm(default).name
  old = config_lib.to_dict(default)
  del old["network"], old["adapt_norm"]
  assert config_lib.from_dict(old) == default


def test_query_images_change_at_test_time_only_within_the_drawings():
  cfg = config_lib.get_config("omniglot_5w5s_imaml_gd")
  assert "q_query" in config_lib.TEST_TIME_FIELDS
  tested = config_lib.apply_test_time_overrides(cfg, ["q_query=1"])
  assert config_lib.differences(cfg, tested) == {"q_query": (15, 1)}
  # An Omniglot character has 20 drawings: support and query must fit.
  with pytest.raises(
    config_lib.ConfigError,
    match=r"k_shot \+ q_query = 5 \+ 16 is more than the 20",
  ):
    config_lib.apply_test_time_overrides(cfg, ["q_query=16"])
  # Sinusoid tasks have no such limit.
  sinusoid = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), ["q_query=50"]
  )
  assert sinusoid.q_query == 50


def test_unknown_config_lists_valid_names():
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.get_config("omniglot_5w1s_imaml")
  assert "omniglot_5w1s_imaml_gd" in str(info.value)
  assert "sinusoid" in str(info.value)


def test_dict_round_trip_and_differences():
  cfg = config_lib.get_config("omniglot_20w1s_reptile")
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
  other = dataclasses.replace(cfg, meta_batch=2)
  assert config_lib.differences(cfg, other) == {"meta_batch": (5, 2)}
  with pytest.raises(config_lib.ConfigError, match="unknown fields"):
    config_lib.from_dict({**config_lib.to_dict(cfg), "extra": 1})


def test_stored_configs_from_before_a_field_existed_keep_their_behaviour():
  cfg = config_lib.get_config("omniglot_5w1s_imaml_gd")
  assert cfg.inner_backtrack and cfg.task_chunk == 0
  old = config_lib.to_dict(cfg)
  del old["inner_backtrack"], old["task_chunk"]
  restored = config_lib.from_dict(old)
  assert restored.inner_backtrack is False and restored.task_chunk == 0
  assert config_lib.differences(cfg, restored) == {
    "inner_backtrack": (True, False)
  }
  del old["lam"]
  with pytest.raises(config_lib.ConfigError, match=r"missing \['lam'\]"):
    config_lib.from_dict(old)


def test_stored_configs_from_before_damping_run_the_paper_system():
  cfg = config_lib.get_config("omniglot_5w1s_imaml_gd_authors")
  old = config_lib.to_dict(cfg)
  del old["cg_damping"], old["lam_damping"], old["adam_eps"]
  restored = config_lib.from_dict(old)
  assert (restored.cg_damping, restored.lam_damping, restored.adam_eps) == (
    0.0,
    0.0,
    1e-8,
  )
  assert config_lib.differences(cfg, restored) == {
    "cg_damping": (1.0, 0.0),
    "lam_damping": (10.0, 0.0),
    "adam_eps": (1e-3, 1e-8),
  }


def test_stored_configs_from_before_log_residual_resume_with_its_default():
  """log_residual changes only what is logged: a run stored before it
  existed resumes with the same command (its default, false)."""
  cfg = config_lib.get_config("omniglot_5w1s_imaml_gd")
  old = config_lib.to_dict(cfg)
  del old["log_residual"]
  assert config_lib.differences(cfg, config_lib.from_dict(old)) == {}


def test_log_residual_applies_to_imaml_only():
  config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), ["log_residual=true"]
  )
  with pytest.raises(config_lib.ConfigError, match="log_residual applies"):
    config_lib.apply_overrides(
      config_lib.get_config("sinusoid_maml"), ["log_residual=true"]
    )


def test_stored_configs_from_before_weight_decay_run_without_it():
  cfg = config_lib.apply_overrides(
    config_lib.get_config("omniglot_5w1s_imaml_gd"), ["weight_decay=0.1"]
  )
  old = config_lib.to_dict(cfg)
  del old["weight_decay"]
  assert config_lib.differences(cfg, config_lib.from_dict(old)) == {
    "weight_decay": (0.1, 0.0)
  }


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_weight_decay_is_decoupled_from_the_meta_gradient(optimizer, schedule):
  """Closed forms of one outer step, ``theta - lr (u + w theta)``.

  A zero meta-gradient leaves only the decay (Adam's step ``m / (sqrt(v) +
  eps)`` is 0 there); a gradient on one coordinate moves that coordinate by
  the optimizer's own step plus the decay, and the others by the decay
  alone. Without decay the optimizer is the plain one, with the same state.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from imaml_jax.train import experiment

  base = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"),
    [
      f"optimizer={optimizer}",
      "meta_lr=0.01",
      f"lr_schedule={schedule}",
      "meta_steps=4",
    ],
  )
  theta = {"w": jnp.array([2.0, -4.0, 1.0])}
  grad = {"w": jnp.array([0.0, 0.0, 0.5])}
  decayed = experiment.optimizer(dataclasses.replace(base, weight_decay=0.25))
  zero, _ = decayed.update({"w": jnp.zeros(3)}, decayed.init(theta), theta)
  assert jnp.allclose(zero["w"], -0.01 * 0.25 * theta["w"], rtol=1e-6)
  step, _ = decayed.update(grad, decayed.init(theta), theta)
  own = 1.0 if optimizer == "adam" else 0.5  # Adam's first step: g/|g|.
  expected = -0.01 * (jnp.array([0.0, 0.0, own]) + 0.25 * theta["w"])
  assert jnp.allclose(step["w"], expected, rtol=1e-5)
  plain = experiment.optimizer(base)
  lr = optax.linear_schedule(0.01, 0.0, 4) if schedule == "linear" else 0.01
  reference = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
  assert jax.tree_util.tree_structure(
    plain.init(theta)
  ) == jax.tree_util.tree_structure(reference.init(theta))


_slow = pytest.mark.slow


@pytest.mark.parametrize(
  "name",
  [
    "omniglot_5w1s_reptile",
    "sinusoid_maml",
    pytest.param("omniglot_5w1s_imaml_gd", marks=_slow),
    pytest.param("omniglot_5w1s_imaml_hf", marks=_slow),
    pytest.param("omniglot_20w5s_maml", marks=_slow),
    pytest.param("omniglot_5w1s_fomaml", marks=_slow),
    pytest.param("omniglot_5w1s_imaml_gd_authors", marks=_slow),
    pytest.param("miniimagenet_5w1s_imaml_gd", marks=_slow),
  ],
)
def test_configs_build_and_trace(name):
  import jax
  import numpy as np

  import imaml_jax as im
  from imaml_jax import train
  from imaml_jax.train import experiment

  cfg = config_lib.apply_overrides(
    config_lib.get_config(name), ["meta_batch=2"]
  )
  size, channels = (84, 3) if cfg.dataset == "miniimagenet" else (28, 1)
  images = (
    None
    if cfg.dataset == "sinusoid"
    else np.zeros((cfg.n_way + 1, 20, size, size, channels), np.uint8)
  )
  exp = experiment.build(cfg, experiment.Data(images, images, images))
  init, _ = im.make_meta_step(
    exp.loss, exp.optimizer, exp.algorithm, has_aux=True
  )
  key = jax.random.key(0)
  state = jax.eval_shape(lambda k: init(exp.init_params(k)), key)
  sums = train.init_sums(train.metric_shapes(exp, state, key))
  new_state, _ = jax.eval_shape(
    train.make_train_step(exp), state, sums, exp.data.train, key
  )
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_class_counts_are_checked_at_the_boundary():
  """n_way equal to a split's classes is served; one more is refused, and
  the validation split counts only where the run validates."""
  import numpy as np

  from imaml_jax.train import experiment

  images = lambda n: np.zeros((n, 20, 28, 28, 1), np.uint8)
  config = config_lib.get_config("omniglot_5w1s_imaml_gd")
  data = experiment.Data(images(5), images(4), images(5))
  with pytest.raises(config_lib.ConfigError, match="the 4 classes of the val"):
    experiment.check_class_counts(config, data)
  experiment.check_class_counts(
    config_lib.apply_overrides(config, ["val_every=0"]), data
  )
  experiment.check_class_counts(config, data._replace(val=images(5)))


def test_class_rotations_decide_the_omniglot_classes():
  """``class_rotations`` reaches the data a run loads: 4,400 training
  classes (each rotation a class) by default, the 1,100 characters
  unrotated with ``per_task``; a stored config without the field reads as
  the default."""
  import os

  from imaml_jax import train

  data_dir = os.environ.get("IMAML_OMNIGLOT_DIR")
  if not data_dir:
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  base = config_lib.get_config("omniglot_5w1s_imaml_gd")
  counts = {}
  for mode in config_lib.CLASS_ROTATIONS:
    cfg = config_lib.apply_overrides(base, [f"class_rotations={mode}"])
    data = train.build_experiment(cfg, data_dir).data
    counts[mode] = (len(data.train), len(data.val), len(data.test))
  assert counts == {"classes": (4400, 400, 1692), "per_task": (1100, 100, 423)}
  stored = config_lib.to_dict(base)
  del stored["class_rotations"]
  assert config_lib.from_dict(stored).class_rotations == "classes"
