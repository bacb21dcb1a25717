"""TrainState: everything that changes during training, as one pytree (checkpointed whole).

The network's structure (the nnx GraphDef) is static and lives outside, in the step's closure; the state holds
only arrays, so ``train_step`` is a pure function of (state, batch).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied so far
  # nnx.State of the student's variables (backbone + head): its nnx.Param leaves and, for networks with BatchNorm,
  # its nnx.BatchStat running statistics (train/step.py "BatchNorm statistics"); a ViT has parameters only
  student: Any
  teacher: Any  # same structure: parameters = EMA of the student's, never differentiated; statistics its own
  opt_state: Any  # optax state for the student's parameters (not its statistics)
  loss_state: Any  # method-specific state (e.g. DINO centres); {} for SimDINO
  rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step), so a resumed run draws the same noise
  # config.distill: the frozen teacher's nnx.State (never updated; checkpointed with the state: train/distill.py)
  distill_teacher: Any = None
  # config.gram: Gram anchoring's frozen snapshot of the EMA teacher's backbone (train/gram.py); None when off
  gram_teacher: Any = None
