"""Shared fixtures: a tiny config that trains in seconds on CPU."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def make_tiny_config():
  from simdino_jax import defaults

  c = defaults.base_config()
  c.method = "simdino"
  c.batch_size = 8
  c.total_steps = 4
  c.warmup_steps = 1
  c.log_every = 1
  c.data.source = "digits"
  c.data.num_global, c.data.num_local = 2, 2
  c.data.global_size, c.data.local_size = 16, 8
  c.model.variant = "mu/4"
  c.model.embed_dim, c.model.depth, c.model.num_heads = 32, 2, 2
  c.model.img_size = 16
  c.model.drop_path_rate = 0.1
  c.head.hidden_dim, c.head.out_dim, c.head.num_layers = 64, 16, 3
  c.loss.eps = 0.5
  c.optim.lr, c.optim.lr_scaling = 1e-3, "none"
  c.eval.batch_size = 64
  return c


@pytest.fixture
def tiny_config():
  return make_tiny_config()
