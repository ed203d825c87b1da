"""mtl_optax: multi-task learning optimisers as pure optax transformations.

    import mtl_optax as mo
    losses, grads = mo.task_grads(loss_fn, params, batch)   # stacked, leading task axis
    tx = optax.chain(mo.cagrad(c=0.4), optax.adam(1e-3))
    updates, state = tx.update(grads, state, params, losses=losses)
"""

# --- core protocol -----------------------------------------------------------
from mtl_optax._src.base import AggregatorInfo
from mtl_optax._src.base import AggregatorState
from mtl_optax._src.base import RuleOutput
from mtl_optax._src.base import TaskGradients
from mtl_optax._src.base import aggregator_info
from mtl_optax._src.base import diagnostics
from mtl_optax._src.base import make_aggregator
from mtl_optax._src.base import task_weights
from mtl_optax._src.task_grads import representation_grads
from mtl_optax._src.task_grads import representation_update
from mtl_optax._src.task_grads import task_grads
from mtl_optax._src import linalg

# --- fixed and loss-based weightings (§A) ------------------------------------
from mtl_optax._src.methods.scalarization import linear_scalarization
from mtl_optax._src.methods.scalarization import mean
from mtl_optax._src.methods.scalarization import sum  # pylint: disable=redefined-builtin

# --- gradient aggregators (§B) -----------------------------------------------
from mtl_optax._src.methods.cagrad import cagrad
from mtl_optax._src.methods.imtl import imtl
from mtl_optax._src.methods.mgda import mgda
from mtl_optax._src.methods.pcgrad import pcgrad

# --- sharpness-aware MTL (§C) ------------------------------------------------

# --- metrics and training helpers --------------------------------------------
from mtl_optax._src.training import make_nnx_train_step
from mtl_optax._src.training import make_train_step

__version__ = "0.1.0"
