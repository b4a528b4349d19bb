import os
import sys

# Before torch loads OpenMP: on a shared machine, spinning worker threads wait for each other's
# time slices, which slowed training steps many times over (README, Benchmarks); sleeping
# waiters avoid that. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.train import run

sys.exit(run())
