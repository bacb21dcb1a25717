"""Driver of tests/test_torch_interop.py's official-constructor test, run by a Python with PyTorch
(SIMDINO_TORCH_PYTHON): for a DINO-layout and two DINOv2-layout tiny ViTs with random parameters, the official
module is built from the exact text ``torch_interop.official_constructor`` gives (what the export command prints and
docs/interop.md lists), evaluated against the official clones (facebookresearch/dino ``vision_transformer.py``,
facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``), loads ``to_torch``'s state dict with
``strict=True``, and its final-norm features are compared with our ViT's on the same images.

Two controls show what the arguments prevent: a DINO ``VisionTransformer`` with the official defaults (qkv_bias=False)
fails the strict load, and one with qkv_bias=True but nn.LayerNorm's default eps 1e-5 loads and differs.

  python tests/official_constructor_load.py OFFICIAL_DIR  -> prints one JSON line
"""

import functools
import json
import os
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from simdino_jax.io import torch_interop
from simdino_jax.models.vit import VisionTransformer
from simdino_jax.tree import map_with_name, named_leaves

MODELS = {
  "dino": dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16),
  "dinov2_registers_layerscale": dict(
    patch_size=4, embed_dim=32, depth=2, num_heads=4, img_size=16, num_registers=2, layerscale_init=0.1
  ),
  "dinov2_swiglu": dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16, ffn="swiglu"),
}


def random_vit(kwargs: dict, seed: int):
  """Our ViT with every parameter random (LayerNorm scales and tokens too), and those parameters. The scale is the
  official initialisation's (std 0.02; LayerNorm scales around 1), so the residual stream's variance is small, as
  in a real network, and LayerNorm's eps visibly matters."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionTransformer(**kwargs, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  values = {
    k: ((1.0 if k.endswith("/scale") else 0.0) + rng.normal(0.0, 0.1 if k.endswith("/scale") else 0.02, v.shape))
    for k, v in named_leaves(state).items()
  }
  values = {k: v.astype(np.float32) for k, v in values.items()}
  if "num_registers" not in kwargs and "layerscale_init" not in kwargs and kwargs.get("ffn") != "swiglu":
    values["mask_token"] = np.zeros_like(values["mask_token"])  # untrained: the DINO v1 layout
  return nnx.merge(graphdef, map_with_name(lambda name, _: jnp.asarray(values[name]), state)), values


def official_features(model, flavor: str, x: torch.Tensor) -> np.ndarray:
  """Final-norm tokens [cls, (registers dropped), patches] of the official model, (B, 1 + N, D)."""
  with torch.no_grad():
    if flavor == "dino":
      return model.get_intermediate_layers(x, n=1)[0].numpy()
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1).numpy()


def main(official: str) -> None:
  sys.path.insert(0, os.path.join(official, "dino"))
  sys.path.insert(0, os.path.join(official, "dinov2"))
  warnings.filterwarnings("ignore", message="xFormers is not available")
  import dinov2.models.vision_transformer  # pylint: disable=import-outside-toplevel
  import vision_transformer  # pylint: disable=import-outside-toplevel  (DINO's)

  namespace = {"vision_transformer": vision_transformer, "dinov2": dinov2, "partial": functools.partial, "nn": torch.nn}
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  report = {}
  for i, (name, kwargs) in enumerate(MODELS.items()):
    ours_model, params = random_vit(kwargs, seed=i)
    out = ours_model(jnp.asarray(images))
    ours = np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["patch"])], axis=1)
    sd = torch_interop.to_torch(params)
    flavor = "dinov2" if "mask_token" in sd else "dino"
    # The kwargs the export command passes: shapes from the state dict, the head count from the run's config.
    imported = torch_interop.load_state_dict(sd, config={"model": {"num_heads": kwargs["num_heads"]}})
    constructor = torch_interop.official_constructor(imported.kwargs, flavor)
    model = eval(constructor.split(" of facebookresearch/")[0], namespace)  # exactly the printed arguments
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True)
    model.eval()
    report[name] = {
      "flavor": flavor,
      "constructor": constructor,
      "max_abs_diff": float(np.max(np.abs(official_features(model, flavor, x) - ours))),
      "scale": float(np.max(np.abs(ours))),
    }
    if flavor == "dino":  # the controls
      common = dict(img_size=[16], patch_size=4, embed_dim=32, depth=2, num_heads=2)
      try:
        vision_transformer.VisionTransformer(**common).load_state_dict(tensors, strict=True)
        report["control_default_strict_error"] = None
      except RuntimeError as e:
        report["control_default_strict_error"] = " ".join(str(e).split())[:300]
      eps5 = vision_transformer.VisionTransformer(**common, qkv_bias=True).eval()
      eps5.load_state_dict(tensors, strict=True)
      report["control_eps_1e-5_max_abs_diff"] = float(np.max(np.abs(official_features(eps5, "dino", x) - ours)))
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])
