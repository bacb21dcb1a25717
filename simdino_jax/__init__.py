"""SimDINO / SimDINOv2 and the DINO family in JAX/Flax."""
