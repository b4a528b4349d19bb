"""``fashion-train``: ``python -m training`` as a console script (same options, same exit statuses)."""

import os


def main() -> int:
    # Before torch loads OpenMP, as in training/__main__.py: spinning waiters collapse on a shared CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from training.train import run

    return run()
