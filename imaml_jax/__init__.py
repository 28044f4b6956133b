"""imaml_jax: implicit model-agnostic meta-learning (iMAML) in JAX."""
from imaml_jax._src.types import Task

__version__ = "0.1.0"
