"""Networks and losses for few-shot learning: Omniglot, mini-ImageNet, sinusoid.

Every network is a `flax.linen.Module` with only a ``params`` collection (batch
norm uses batch statistics, no running averages). Losses follow the core's
convention `loss_fn(params, batch) -> (loss, aux)`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from imaml_jax import models
  >>> net = models.omniglot_convnet(n_way=5)
  >>> x, y = jnp.zeros((5, 28, 28, 1)), jnp.arange(5)
  >>> params = models.init_params(net, jax.random.key(0), x)
  >>> loss, aux = models.classification_loss(net)(params, (x, y))
"""

from imaml_jax.models._layers import CONV_FORMULATIONS
from imaml_jax.models._layers import DEFAULT_CONV
from imaml_jax.models._layers import BatchStatNorm
from imaml_jax.models._layers import Conv3x3
from imaml_jax.models._layers import batch_norm
from imaml_jax.models._layers import conv3x3
from imaml_jax.models._layers import conv_output_size
from imaml_jax.models._layers import max_pool_2x2
from imaml_jax.models._losses import classification_loss
from imaml_jax.models._losses import regression_loss
from imaml_jax.models._networks import MLP
from imaml_jax.models._networks import NETWORK_VARIANTS
from imaml_jax.models._networks import ConvNet
from imaml_jax.models._networks import init_params
from imaml_jax.models._networks import miniimagenet_convnet
from imaml_jax.models._networks import omniglot_convnet
from imaml_jax.models._networks import sinusoid_mlp
