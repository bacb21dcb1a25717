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
  student: Any  # nnx.State of the student's parameters (backbone + head)
  teacher: Any  # same structure: EMA of the student, never differentiated
  opt_state: Any  # optax state for the student
  loss_state: Any  # method-specific state (e.g. DINO centres); {} for SimDINO
  rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step), so a resumed run draws the same noise
