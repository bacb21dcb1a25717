"""SimDINO / SimDINOv2 and the DINO family in JAX/Flax."""

__all__ = ["load_backbone"]


def __getattr__(name):
  # Lazy: `import simdino_jax` stays cheap (no JAX / Flax import) until the feature extractor is asked for.
  if name == "load_backbone":
    from simdino_jax.backbone import load_backbone  # pylint: disable=g-import-not-at-top

    return load_backbone
  raise AttributeError(f"module 'simdino_jax' has no attribute {name!r}")
