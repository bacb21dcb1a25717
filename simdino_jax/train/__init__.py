"""Training: the trainer (setup, restore, loop), the pure step, the train state and the metrics log.

``python -m simdino_jax.train`` runs ``__main__.py``."""
