"""Driver of tests/test_optimizers.py, run by a Python with PyTorch (SIMDINO_TORCH_PYTHON): DINO's own optimiser
pieces on given parameters and gradients.

  python official_optim_driver.py IN.npz OUT_DIR FROZEN_STEPS CLIP     (writes OUT_DIR/sgd.npz and OUT_DIR/lars.npz)

IN.npz: lrs, wds (per step), "param:<name>" and "grad<step>:<name>" (our slash-separated names, PyTorch shapes).
A module whose named_parameters are those names (dots for slashes) is built; "weight_g" is requires_grad=False
(norm_last_layer). Each step replays main_dino.py's train_one_epoch around the step: the param groups' lr and
(group 0) weight decay, utils.clip_gradients, utils.cancel_gradients_last_layer(epoch=step,
freeze_last_layer=FROZEN_STEPS), then optimizer.step() of torch.optim.SGD(params_groups, lr=0, momentum=0.9) or
utils.LARS(params_groups), as main_dino.py builds them. Each output: "<step>:<name>" after each step.
"""

import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.environ["SIMDINO_OFFICIAL_DIR"], "dino"))
import utils  # noqa: E402  (DINO's utils.py: torch, numpy and PIL only)


def main(src, dst, optimizer, frozen, clip):
  data = np.load(src)
  names = [k.split(":", 1)[1] for k in data.files if k.startswith("param:")]
  root = nn.Module()
  for name in names:
    *parents, last = name.split("/")
    node = root
    for part in parents:
      if not hasattr(node, part):
        node.add_module(part, nn.Module())
      node = getattr(node, part)
    value = torch.tensor(data[f"param:{name}"], dtype=torch.float32)
    node.register_parameter(last, nn.Parameter(value, requires_grad=last != "weight_g"))
  params_groups = utils.get_params_groups(root)
  if optimizer == "sgd":
    opt = torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by scheduler
  else:
    opt = utils.LARS(params_groups)
  by_name = dict(root.named_parameters())
  out = {}
  for it in range(len(data["lrs"])):
    for i, param_group in enumerate(opt.param_groups):
      param_group["lr"] = float(data["lrs"][it])
      if i == 0:  # only the first group is regularized
        param_group["weight_decay"] = float(data["wds"][it])
    opt.zero_grad()
    for name in names:
      p = by_name[name.replace("/", ".")]
      if p.requires_grad:
        p.grad = torch.tensor(data[f"grad{it}:{name}"], dtype=torch.float32)
    if clip:
      utils.clip_gradients(root, clip)
    utils.cancel_gradients_last_layer(it, root, frozen)
    opt.step()
    out.update({f"{it}:{name}": by_name[name.replace("/", ".")].detach().numpy().copy() for name in names})
  np.savez(dst, **out)


if __name__ == "__main__":
  for name in ("sgd", "lars"):
    main(sys.argv[1], os.path.join(sys.argv[2], f"{name}.npz"), name, int(sys.argv[3]), float(sys.argv[4]))
