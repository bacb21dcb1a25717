r"""The official PyTorch SimDINO train step on step_throughput.py's cpu-vit-tiny preset: the reference figure.

Needs PyTorch (not a dependency of simdino_jax) and a clone of the official code (github.com/RobinWu218/SimDINO);
run it with the Python that has torch:

  /path/to/torch-venv/bin/python benchmarks/official_step_torch.py --official_repo /path/to/SimDINO [--threads 2]

or let ``step_throughput.py --torch_python ... --official_repo ...`` run it next to ours (alternating, one at a
time) and report the ratio.

The step is the official one, built from the official modules (``simdino/vision_transformer.py``: vit_tiny,
DINOHead; ``simdino/utils.py``: MultiCropWrapper, get_params_groups, clip_gradients; ``MCRLoss`` taken out of
``simdino/main_dino.py`` without running that file, which imports torchvision and wandb at the top) and run as
``train_one_epoch`` runs it in float32 on CPU: teacher on the 2 global crops, student on all crops, MCR loss,
backward, per-tensor clipping at 3.0, fused AdamW, EMA via ``torch._foreach_lerp_``. Eager (``--compile`` off, the
CPU baseline the issue quotes); ``--compile`` tries torch.compile. The official defaults where the preset does not
fix a value: expa_type 1, eps 0.5, reduce_cov 0, qkv_bias False. One difference to the command-line default, for a
fair comparison: ``img_size=[32]`` so the positional embedding is not interpolated from a 224 px grid every forward
(which the official code would do on 32 px crops; that only makes it slower).

Prints one JSON line: images_per_sec (batch / median step time), step times, threads, torch version.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from simdino_jax import tcmalloc  # pylint: disable=wrong-import-position  # stdlib only: fine in the torch Python


def load_mcr_loss(main_dino_path: str, namespace: dict):
  """Returns the official ``MCRLoss`` class, compiled from its definition in main_dino.py alone."""
  with open(main_dino_path) as f:
    tree = ast.parse(f.read(), main_dino_path)
  nodes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MCRLoss"]
  if not nodes:
    raise SystemExit(f"{main_dino_path}: no class MCRLoss (is --official_repo a clone of RobinWu218/SimDINO?)")
  exec(compile(ast.Module(body=nodes, type_ignores=[]), main_dino_path, "exec"), namespace)  # pylint: disable=exec-used
  return namespace["MCRLoss"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_repo", required=True, help="Clone of RobinWu218/SimDINO (its root or simdino/).")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (intra-op threads).")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="torch.compile the two networks (not the baseline).")
  args = parser.parse_args()

  src = args.official_repo
  if os.path.isdir(os.path.join(src, "simdino")):
    src = os.path.join(src, "simdino")
  for name in ("vision_transformer.py", "utils.py", "main_dino.py"):
    if not os.path.isfile(os.path.join(src, name)):
      raise SystemExit(f"--official_repo={args.official_repo}: {os.path.join(src, name)} not found")
  sys.path.insert(0, src)

  import torch
  import torch.distributed as dist
  import torch.distributed.nn as dist_nn
  import torch.nn.functional as F
  import utils  # the official simdino/utils.py
  import vision_transformer as vits  # the official simdino/vision_transformer.py
  from torch import nn

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  mcr_loss = load_mcr_loss(
    os.path.join(src, "main_dino.py"), {"torch": torch, "nn": nn, "F": F, "dist": dist, "dist_nn": dist_nn}
  )

  num_global, num_local, global_size, local_size = 2, 6, 32, 16
  student = vits.vit_tiny(patch_size=4, drop_path_rate=0.1, img_size=[global_size])
  teacher = vits.vit_tiny(patch_size=4, img_size=[global_size])
  student = utils.MultiCropWrapper(student, vits.DINOHead(192, 65536, hidden_dim=2048, bottleneck_dim=256))
  teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(192, 65536, hidden_dim=2048, bottleneck_dim=256))
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  if args.compile:
    student, teacher = torch.compile(student), torch.compile(teacher)
  loss_fn = mcr_loss(num_global + num_local, 0, 1, 0.5, 1.0)
  optimizer = torch.optim.AdamW(utils.get_params_groups(student), fused=True)
  for i, group in enumerate(optimizer.param_groups):
    group["lr"] = 5e-4 * args.batch_size / 256
    if i == 0:
      group["weight_decay"] = 0.04

  g = torch.Generator().manual_seed(0)
  images = [torch.randn(args.batch_size, 3, global_size, global_size, generator=g) for _ in range(num_global)] + [
    torch.randn(args.batch_size, 3, local_size, local_size, generator=g) for _ in range(num_local)
  ]
  student_params = list(student.parameters())
  teacher_params = list(teacher.parameters())

  def step():
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss, _, _ = loss_fn(student_output, teacher_output)
    optimizer.zero_grad()
    loss.backward()
    utils.clip_gradients(student, 3.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(teacher_params, student_params, weight=1.0 - 0.996)  # pylint: disable=protected-access
    return float(loss.item())  # the official loop reads the loss every step too

  student.train()
  teacher.train()
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(
    json.dumps(
      {
        "benchmark": "official_step_torch",
        "preset": "cpu-vit-tiny",
        "model": "official vit_tiny/4",
        "batch_size": args.batch_size,
        "crops": f"{num_global}x{global_size} + {num_local}x{local_size}",
        "images_per_sec": round(args.batch_size / median, 2),
        "step_time_ms": round(1e3 * median, 2),
        "step_time_ms_min": round(1e3 * min(times), 2),
        "step_time_ms_max": round(1e3 * max(times), 2),
        "steps": len(times),
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "loss": loss,
        "torch_version": torch.__version__,
        "allocator": tcmalloc.allocator(),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
