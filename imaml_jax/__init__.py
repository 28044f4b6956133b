"""imaml_jax: implicit model-agnostic meta-learning (iMAML) in JAX.

The public API; see the README for a tour.
"""

# Subpackages: few-shot data and the paper's networks.
from imaml_jax import data  # noqa: E402
from imaml_jax import models  # noqa: E402
from imaml_jax._src.adapt import adapt
from imaml_jax._src.algorithms import MetaAlgorithm
from imaml_jax._src.algorithms import adapt_all_but_norm
from imaml_jax._src.algorithms import fomaml
from imaml_jax._src.algorithms import imaml
from imaml_jax._src.algorithms import maml
from imaml_jax._src.algorithms import reptile
from imaml_jax._src.hvp import hvp
from imaml_jax._src.hvp import proximal_system_operator
from imaml_jax._src.inner import InnerSolver
from imaml_jax._src.inner import MinibatchObjective
from imaml_jax._src.inner import ProximalObjective
from imaml_jax._src.inner import adam
from imaml_jax._src.inner import gd
from imaml_jax._src.inner import gd_then_pull_back
from imaml_jax._src.inner import hessian_free
from imaml_jax._src.inner import nesterov
from imaml_jax._src.inner import proximal_objective
from imaml_jax._src.linear_solve import LinearSolver
from imaml_jax._src.linear_solve import SolveInfo
from imaml_jax._src.linear_solve import cg
from imaml_jax._src.linear_solve import dense
from imaml_jax._src.linear_solve import neumann
from imaml_jax._src.linear_solve import relative_residual
from imaml_jax._src.meta_step import MetaState
from imaml_jax._src.meta_step import MetaStep
from imaml_jax._src.meta_step import make_eval_step
from imaml_jax._src.meta_step import make_meta_step
from imaml_jax._src.sharding import TASK_AXIS
from imaml_jax._src.sharding import check_divisible
from imaml_jax._src.sharding import constrain_tasks
from imaml_jax._src.sharding import initialize_distributed
from imaml_jax._src.sharding import replicate
from imaml_jax._src.sharding import replicated_sharding
from imaml_jax._src.sharding import shard_meta_step
from imaml_jax._src.sharding import shard_tasks
from imaml_jax._src.sharding import task_mesh
from imaml_jax._src.sharding import task_sharding
from imaml_jax._src.sharding import tasks_from_process_local_data
from imaml_jax._src.sharding import use_cpu_cores
from imaml_jax._src.types import Task

# The sharded episode sampler lives in imaml_jax.data (the core, imaml_jax._src,
# imports nothing from it); the top-level name is kept for existing callers.
from imaml_jax.data import make_sharded_sampler  # noqa: E402

__version__ = "0.1.0"
