"""Data: sources (arrays, folders, tfds), multi-crop augmentation on host or device, block masks, grain pipelines."""
