"""Parameter-tree helpers: stable slash-separated names for leaves of nnx.State / dict pytrees."""

from __future__ import annotations

from typing import Any, Callable

import jax


def path_str(path: tuple) -> str:
  """'blocks/0/attn/qkv/kernel' from a jax key path (DictKey/SequenceKey/GetAttrKey; Variable '.value' dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        parts.append(key.name)
    else:
      parts.append(str(key))
  return "/".join(parts)


def map_with_name(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map where fn receives (name, leaf)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def named_leaves(tree: Any) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
