r"""DINO-vMF ViT-B/16 on ImageNet-1k, 100 epochs: DINO with vMF-normalised logits (docs/methods.md#dino-vmf-and-ibot-vmf).

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/dino_vmf_vitb16_in1k.py --workdir=gs://BUCKET/dino_vmf_vitb16

Runtime: that of configs/dino_vitb16_in1k.py (the log C_p correction costs O(K) per step): ~6e19 FLOP for 100
epochs, roughly 47 h on one H200, ~6 h on 8 (estimate, not measured).
Expected result (DINO-vMF paper, Govindarajan et al., ICLR 2023): k-NN 77.40 top-1 for ViT-B/16 against 76.11 for
DINO trained with the same DINO recipe in that paper. That DINO figure matches the 400-epoch original DINO ViT-B/16
release (76.1), which suggests 400-epoch runs with the original DINO recipe; the paper's epochs and recipe are
UNVERIFIED here (--config.total_epochs=400 for the longer run). At 100 epochs with this config's recipe the DINO
reference point is the SimDINO paper's 72.9 (configs/dino_vitb16_in1k.py).

The recipe is configs/dino_vitb16_in1k.py (the SimDINO comparison's DINO ViT-B/16: batch 512, 10 local crops,
drop path 0.1, K 65536, teacher temperature 0.04 -> 0.07 over 30 epochs, per-tensor clip 3.0, lr 5e-4 x B/256) with
the two changes DINO-vMF makes:
  * unnormalised prototypes (head.norm_last_layer False): the weight-norm gain g is trained, kappa_k = |g_k| / tau;
  * logits <w_k, y> / tau + log C_p(kappa_k) for student (tau_s) and teacher (tau_t), with the one-term uniform
    asymptotic expansion of the Bessel function (vmf.terms 1), and centring in probability space (eq. (9)).
UNVERIFIED (no official DINO-vMF code was found): the training hyperparameters of the paper (batch, lr, epochs,
clipping, freezing); whether log C_p is differentiated in the student without a stop-gradient; the exact form of
the approximation and of the probability-space centre (EMA of log vs log of EMA); centre momentum 0.9; whether
g gets weight decay (PyTorch's weight_g is (K, 1), so DINO's code decays it; simdino_jax/optim.py `decays` does
too, although g is a 1-D (K,) leaf here).
Linear evaluation: configs/dino_vitb16_in1k.py's (DINO's paper protocol for ViT-B: 1 block + avgpool, lr swept); no
linear figure is quoted here, and which linear protocol the DINO-vMF paper used was not checked (UNVERIFIED).
Few-shot evaluation (evals.fewshot) uses the DINO-vMF paper's l2 penalty lambda = 0.075, not MSN's default 0.0025.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_DINO = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dino_vitb16_in1k.py"))


def get_config(arg=None):
  c = _DINO["get_config"](arg)
  c.method = "dino_vmf"  # vmf.terms stays config.py's 1 (the one-term Bessel expansion)
  c.head.norm_last_layer = False
  c.evals.fewshot.lambd = 0.075  # the DINO-vMF paper's few-shot protocol (config.py: MSN's 0.0025)
  return c
