"""mtl_optax: multi-task learning optimisers as pure optax transformations.

Usage::

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
from mtl_optax._src.engine import EngineChoice
from mtl_optax._src.engine import resolve_engine
from mtl_optax._src.factored import factored_task_grads
from mtl_optax._src.jacobian import FactoredJacobian
from mtl_optax._src.task_grads import representation_grads
from mtl_optax._src.task_grads import representation_update
from mtl_optax._src.task_grads import task_grads
from mtl_optax._src import linalg

# --- fixed and loss-based weightings (§A) ------------------------------------
from mtl_optax._src.methods.dwa import dwa
from mtl_optax._src.methods.famo import famo
from mtl_optax._src.methods.geometric_loss import geometric_loss
from mtl_optax._src.methods.go4align import go4align
from mtl_optax._src.methods.gradnorm import gradnorm
from mtl_optax._src.methods.ldc_mtl import ldc_mtl
from mtl_optax._src.methods.random_loss_weighting import random_loss_weighting
from mtl_optax._src.methods.scalarization import linear_scalarization
from mtl_optax._src.methods.scalarization import mean
from mtl_optax._src.methods.scalarization import sum  # pylint: disable=redefined-builtin
from mtl_optax._src.methods.scale_invariant import scale_invariant
from mtl_optax._src.methods.stch import stch
from mtl_optax._src.methods.cosmos import cosmos
from mtl_optax._src.methods.pbi import pbi
from mtl_optax._src.methods.uncertainty_weighting import uncertainty_weighting

# --- gradient aggregators (§B) -----------------------------------------------
from mtl_optax._src.methods.aligned_mtl import aligned_mtl
from mtl_optax._src.methods.auto_lambda import auto_lambda
from mtl_optax._src.methods.cagrad import cagrad
from mtl_optax._src.methods.cdtt import cdtt
from mtl_optax._src.methods.config import config
from mtl_optax._src.methods.db_mtl import db_mtl
from mtl_optax._src.methods.dualproj import dualproj
from mtl_optax._src.methods.edm import edm
from mtl_optax._src.methods.excess_mtl import excess_mtl
from mtl_optax._src.methods.fairgrad import fairgrad
from mtl_optax._src.methods.forum import forum
from mtl_optax._src.methods.graddrop import graddrop
from mtl_optax._src.methods.gradvac import gradvac
from mtl_optax._src.methods.imtl import imtl
from mtl_optax._src.methods.krum import krum
from mtl_optax._src.methods.mgda import mgda
from mtl_optax._src.methods.moco import moco
from mtl_optax._src.methods.moml import moml
from mtl_optax._src.methods.modo import modo
from mtl_optax._src.methods.nash_mtl import nash_mtl
from mtl_optax._src.methods.pcgrad import pcgrad
from mtl_optax._src.methods.rotograd import rotograd
from mtl_optax._src.methods.rotograd import rotograd_rotation_loss
from mtl_optax._src.methods.rotograd import rotograd_rotations
from mtl_optax._src.methods.rotograd import rotograd_update
from mtl_optax._src.methods.sdmgrad import multi_batch_task_grads
from mtl_optax._src.methods.sdmgrad import sdmgrad
from mtl_optax._src.methods.trimmed_mean import trimmed_mean
from mtl_optax._src.methods.upgrad import upgrad
from mtl_optax._src.methods.conicgrad import conicgrad
from mtl_optax._src.methods.cr_mogm import cr_mogm
from mtl_optax._src.methods.ngdiff import ngdiff
from mtl_optax._src.grouped import group_diagnostics
from mtl_optax._src.grouped import grouped

# --- sharpness-aware MTL (§C) ------------------------------------------------
from mtl_optax._src.flat import flat
from mtl_optax._src.samo import SamoState
from mtl_optax._src.samo import samo_perturbation
from mtl_optax._src.samo import samo_task_grads
from mtl_optax._src.sharpness import sharpness_aware_task_grads
from mtl_optax._src.sharpness import task_perturbation

# --- metrics and training helpers --------------------------------------------
from mtl_optax import metrics
from mtl_optax._src import distributed
from mtl_optax._src.training import make_nnx_train_step
from mtl_optax._src.training import make_train_step

__version__ = "0.2.0"
