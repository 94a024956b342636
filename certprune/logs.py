"""Progress and warnings through stdlib ``logging``, set up once by the command line.

Under torchrun only rank 0 speaks (one filter, instead of a rank check beside every message); lines go through
``tqdm.write`` so they never tear a progress bar. The library itself only logs to the ``certprune`` logger, which
stays silent in a program that configures no handler.
"""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

from . import distributed


class RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return distributed.is_main()


class Formatter(logging.Formatter):
    """Progress lines as they are; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.capitalize()}: {text}"


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)  # looked up per line: a redirected stderr is honoured


def setup_logging(quiet: bool = False) -> logging.Logger:
    logger = logging.getLogger("certprune")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(handler, TqdmHandler) for handler in logger.handlers):
        handler = TqdmHandler()
        handler.addFilter(RankZeroFilter())
        handler.setFormatter(Formatter())
        logger.addHandler(handler)
        logger.propagate = False
    return logger
