"""``config.init_from``: a fresh run whose student and teacher start from exported weights or another run's teacher.

The backbone, and every head whose arrays are all present with equal shapes, replace the initial parameters
(``io.restore.load_init_arrays`` / ``match_init_arrays`` decide what matches and say why the rest does not);
the step is 0 and the optimizer state is initialised afresh for the new parameters.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax

from simdino_jax.io import restore
from simdino_jax.train.state import TrainState
from simdino_jax.tree import map_with_name, named_leaves


def load(path: str, state: TrainState, tx: optax.GradientTransformation, opt_sharding, log: Callable[[str], None]):
  """``state`` (the initial state) with the weights at ``path`` placed on each parameter's sharding, and ``tx``'s
  state initialised for them with ``opt_sharding``."""
  arrays, source = restore.load_init_arrays(path)
  params = named_leaves(state.student)
  loaded, notes = restore.match_init_arrays(params, arrays)

  def place(name, leaf):
    if name not in loaded:
      return leaf
    value = np.asarray(loaded[name]).astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

  student = map_with_name(place, state.student)
  teacher = map_with_name(place, state.teacher)
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(student)
  log(
    f"initialised from the {source} (config.init_from): {len(loaded)} of {len(params)} parameter arrays; "
    + ", ".join(["backbone loaded"] + notes)
  )
  if state.gram_teacher is not None:  # config.gram: the Gram teacher starts as the (loaded) teacher's backbone
    state = state.replace(gram_teacher=jax.tree_util.tree_map(lambda x: x.copy(), teacher["backbone"]))
  return state.replace(student=student, teacher=teacher, opt_state=opt_state)
