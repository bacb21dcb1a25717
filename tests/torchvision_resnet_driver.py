"""Runs torchvision's ResNet (in the PyTorch venv) on a state dict and images from tests/test_resnet.py.

argv: input .npz (``arch``, ``images`` NCHW float32, ``sd/<key>`` a torchvision state dict without fc), output .npz.
Builds ``torchvision.models.<arch>()`` with ``fc = nn.Identity()`` (DINO's main_dino.py), loads the state dict with
strict=True, and writes the loaded state dict, the eval-mode and train-mode features (float32, and float64 as
``eval64`` / ``train64``) and the state dict after the float32 train-mode forward (the running statistics updated by torch's BatchNorm2d).
"""

import copy
import sys
import types

import numpy as np

# torchvision 0.28 with the local torch wheel: this module only registers meta kernels and fails to load.
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import torch
import torchvision


def main(src, dst):
  data = np.load(src)
  sd = {k[3:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("sd/")}
  model = torchvision.models.__dict__[str(data["arch"])]()
  model.fc = torch.nn.Identity()
  model.load_state_dict(sd, strict=True)
  out = {f"loaded/{k}": v.detach().clone().numpy() for k, v in model.state_dict().items()}
  x = torch.from_numpy(data["images"])
  double = copy.deepcopy(model).double()  # float64: how far float32 rounding alone moves torch's own features
  with torch.no_grad():
    for m, x_, suffix in ((model, x, ""), (double, x.double(), "64")):
      m.eval()
      out[f"eval{suffix}"] = m(x_).numpy()
      m.train()
      out[f"train{suffix}"] = m(x_).numpy()
  out.update({f"after/{k}": v.detach().clone().numpy() for k, v in model.state_dict().items()})
  np.savez(dst, **out)
  print("ok")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
