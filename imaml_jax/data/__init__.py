"""Data for meta-learning: Omniglot, Mini-ImageNet, synthetic task families.

Omniglot and Mini-ImageNet are held as ``uint8[n_classes, n_per_class, H, W,
C]`` class arrays; :func:`sample_tasks` draws N-way K-shot episodes from such
an array on device, and :func:`make_sharded_sampler` draws them on the devices
of a mesh, each device its own share. The synthetic families return
:class:`~imaml_jax.Task` batches directly.
"""

from imaml_jax.data import synthetic
from imaml_jax.data._download import OMNIGLOT_MD5
from imaml_jax.data._download import OMNIGLOT_URL
from imaml_jax.data._download import download_omniglot
from imaml_jax.data._download import file_checksum
from imaml_jax.data._mini_imagenet import MINI_IMAGENET_CLASSES
from imaml_jax.data._mini_imagenet import load_mini_imagenet_csv
from imaml_jax.data._mini_imagenet import load_mini_imagenet_pickle
from imaml_jax.data._omniglot import AUTHORS_N_TRAIN
from imaml_jax.data._omniglot import AUTHORS_TEST_SEED
from imaml_jax.data._omniglot import AUTHORS_TRAIN_SEED
from imaml_jax.data._omniglot import OMNIGLOT_ARCHIVES
from imaml_jax.data._omniglot import OmniglotData
from imaml_jax.data._omniglot import Splits
from imaml_jax.data._omniglot import authors_permutation
from imaml_jax.data._omniglot import default_cache_dir
from imaml_jax.data._omniglot import load_omniglot
from imaml_jax.data._omniglot import load_omniglot_tfds
from imaml_jax.data._omniglot import omniglot_authors_split_indices
from imaml_jax.data._omniglot import omniglot_authors_test
from imaml_jax.data._omniglot import omniglot_from_tfds_examples
from imaml_jax.data._omniglot import omniglot_split_indices
from imaml_jax.data._omniglot import omniglot_splits
from imaml_jax.data._omniglot import rotate_classes
from imaml_jax.data._omniglot import rotate_task_classes
from imaml_jax.data._sampler import evaluation_task_chunks
from imaml_jax.data._sampler import evaluation_tasks
from imaml_jax.data._sampler import make_sharded_sampler
from imaml_jax.data._sampler import reptile_minibatch_rows
from imaml_jax.data._sampler import reptile_minibatches
from imaml_jax.data._sampler import sample_tasks
from imaml_jax.data._sampler import sample_tasks_from_keys
from imaml_jax.data.synthetic import linear_regression_exact_meta_gradient
from imaml_jax.data.synthetic import linear_regression_inner_solution
from imaml_jax.data.synthetic import linear_regression_loss
from imaml_jax.data.synthetic import linear_regression_tasks
from imaml_jax.data.synthetic import sinusoid_tasks
