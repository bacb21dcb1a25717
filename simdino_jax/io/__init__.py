"""Reading and writing files: ``formats`` (safetensors / npz arrays with metadata), ``checkpointing`` (orbax
checkpoints of a run: saving, resuming), ``restore`` (read-only restores of any run's checkpoints: export,
load_backbone, config.resume, config.init_from) and ``torch_interop`` (official PyTorch state dicts).

Imports only from models, tree and errors, never from methods, train/, evaluate, export or evals.
"""
