"""certprune: HYDRA pruning of neural networks that stay certifiably robust.

The Python API a researcher imports: :func:`prune` and :func:`verify`, one call each on a model in memory
(:mod:`certprune.api`); masks (:mod:`certprune.masking`), losses, the training loop, the three phases
(:mod:`certprune.pipeline`), sweeps, and ``load_run`` for a finished run's model.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("certprune")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .api import prune, verify  # noqa: E402  (after __version__: the CLI reads it)
from .runs import load_run  # noqa: E402

__all__ = ["__version__", "load_run", "prune", "verify"]
