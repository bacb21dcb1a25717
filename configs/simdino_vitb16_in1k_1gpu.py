r"""SimDINO ViT-B/16 on ImageNet-1k on ONE GPU: the official recipe (configs/simdino_vitb16_in1k.py) at its own global
batch of 512 (the official 8 GPUs x 64; the 1024 of SimDINOv2's ViT-B/16 recipe is 8 x 128), as 8 micro-batches of 64
accumulated inside the jitted step (train/accumulation.py, docs/training.md#gradient-accumulation).

  python -m simdino_jax.train --config=configs/simdino_vitb16_in1k_1gpu.py --workdir=/path/to/simdino_vitb16_1gpu

Objective: the official run's exactly. Its covariances are per GPU (reduce_cov=0: 64 rows, normalised by the global
512, eps 0.05); here each micro-batch of 64 is one covariance (accumulation_mode "micro", loss.groups 1) with
eps = sqrt(8 x 0.05) (coding_rate.py's mapping), gamma 1/256 + 1/512, the 8 micro-gradients averaged as DDP averages
the 8 GPUs' gradients; one AdamW update and one teacher EMA update per 512 images, the schedules of the 512 batch.
For the global covariance of all 512 rows (reduce_cov=1, the maintainers' recommendation; one student forward more):
  --config.accumulation_mode=exact --config.loss.eps=0.2236

Runtime and memory, ESTIMATED FROM THE COMPILED PROGRAM, NOT MEASURED ON A GPU (`python
benchmarks/accumulation_cost.py`: XLA's memory_analysis / cost_analysis of this jitted step, compiled for CPU with
jax 0.10.2; bfloat16 compute, float32 state):
  memory: state 1.47 GB (student + teacher + AdamW moments, 92.1M student parameters with the head); the step's
    arguments 2.66 GB + temporaries 56.2 GB (one micro-batch of 64 alive) = 58.9 GB peak, inside one 80 GB GPU
    (a GPU's buffer assignment differs from the CPU's; the official AMP step runs 64 images on a 40 GB GPU);
  FLOPs: 30.4 TFLOP per micro-batch of 64 (476 GFLOP per image: student 2 x 224 + 10 x 96 forward + backward,
    teacher 2 x 224 forward), 244 TFLOP per step of 512;
  speed: at an assumed 40% MFU of an H100 SXM (989 bfloat16 TFLOP/s) 0.62 s per step, ~830 images/s, ~43 h for
    the 100 epochs (250,200 steps).
  "exact" adds one student forward per image (about +28% FLOPs by token count) and stores the 512 x 12 x 256 head
  outputs (6 MB).
Expected result: the official run's objective, so its published k-NN 74.9 / linear 77.3 top-1 (ImageNet-1k val),
not reproduced here.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_VITB16 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "simdino_vitb16_in1k.py"))


def get_config(arg=None):
  c = _VITB16["get_config"](arg)
  # batch_size: the recipe's 512, the official global batch (8 GPUs x 64)
  c.accumulation_steps = 8  # micro-batches of 64: the official per-GPU batch
  # accumulation_mode: the default "micro", one covariance per micro-batch
  c.loss.groups = 1  # one covariance per micro-batch (= per official GPU); eps stays sqrt(8 x 0.05)
  c.data.num_workers = 8
  return c
