"""Smoke-run every paper config (configs/paper/*.yaml) on CPU and time each stage.

Why a script and not the suite: at real shapes (VGG16-BN, WRN-28-4, ResNet-110 on 32 x 32 x 3, TRADES with 10
attack steps) even 16 training images take tens of seconds per config on 2 cores, so the suite runs only the
representative config (tests/test_paper_configs.py, whose ``smoke_run`` this calls) and this runs them all.
It prints wall-clock and CPU seconds (CPU seconds say more on a shared machine) per stage and config.

    .venv/bin/python benchmarks/smoke_paper_configs.py [configs/paper/svhn-wrn-28-4.yaml ...]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_paper_configs import CONFIGS, smoke_run  # noqa: E402  (the suite's own smoke run)


def main() -> None:
    paths = [Path(arg).resolve() for arg in sys.argv[1:]] or CONFIGS
    failures = 0
    print(f"{'config':<34} {'wall s':>8} {'cpu s':>8}  stages (wall s)")
    for path in paths:
        wall, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                result = smoke_run(path, Path(workdir))
                stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result["seconds"].items())
            except Exception as error:  # report every config, then fail
                failures += 1
                stages = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"{path.name:<34} {time.perf_counter() - wall:>8.1f} {time.process_time() - cpu:>8.1f}  {stages}",
              flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
