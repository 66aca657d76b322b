"""Random-parameter tests: a fresh seed every run, printed, replayable.

``CRYPTFUSE_TEST_SEED=N`` replays the run that printed ``seed N``.
"""

from __future__ import annotations

import os
import random


def seeded_rng() -> random.Random:
    """A generator for a random-parameter test: seeded anew each run (the seed is
    printed), or from ``CRYPTFUSE_TEST_SEED`` to replay a failure."""
    seed = int(os.environ.get("CRYPTFUSE_TEST_SEED", random.randrange(1 << 32)))
    print(f"seed {seed}")
    return random.Random(seed)
