"""Losses on arrays: coding rate, SimDINO / SimDINOv2, DINO / iBOT / KoLeo / Sinkhorn-Knopp, vMF, Table 5 regularizers."""
