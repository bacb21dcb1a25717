"""Reading and writing files: ``formats`` (safetensors / npz arrays with metadata), ``checkpointing`` (orbax
checkpoints of a run: saving, resuming, read-only restores) and ``torch_interop`` (official PyTorch state dicts).

Imports only from methods, models, tree, errors and config, never from train/, evaluate, export or evals.
"""
