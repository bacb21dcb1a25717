"""File formats and checkpoints: safetensors / npz arrays, orbax checkpoints of a run, PyTorch state dicts."""
