"""certprune: HYDRA pruning of neural networks that stay certifiably robust.

The Python API a researcher imports: masks (:mod:`certprune.masking`), losses, the training loop, the three phases
(:mod:`certprune.pipeline`), sweeps, and ``load_run`` for a finished run's model.
"""
from .runs import load_run

__all__ = ["load_run"]
