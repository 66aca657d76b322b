"""Coverage-guided fuzzing of one target of tests/fuzz_targets.py with atheris.

    python tests/fuzz_run.py TARGET [--seconds N] [--corpus DIR] [--artifacts DIR]

Seeds the corpus directory (default: build/fuzz/TARGET) from the shared corpus,
instruments the cryptfuse modules the target reaches and runs libFuzzer for N
seconds.  A crash leaves its input in the artifacts directory (default build/fuzz/)
as ``crash-*``, and the exit status is non-zero: copy the input to
``tests/fuzz_regressions/TARGET/`` (tests/test_fuzz.py replays it) and fix the bug.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["cryptfuse"]):
    import fuzz_targets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(fuzz_targets.TARGETS))
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--corpus", type=Path)
    parser.add_argument(
        "--seed", type=int, default=0, help="libFuzzer's random seed (0: a new one each run)"
    )
    parser.add_argument("--artifacts", type=Path, default=HERE.parent / "build" / "fuzz")
    args = parser.parse_args()
    corpus = args.corpus or HERE.parent / "build" / "fuzz" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    for data in fuzz_targets.seeds(args.target):
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    for name, data in fuzz_targets.regressions(args.target):
        (corpus / f"regression-{name}").write_bytes(data)
    target = fuzz_targets.TARGETS[args.target]
    libfuzzer_args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={args.seconds}",
        f"-max_len={fuzz_targets.MAX_LEN.get(args.target, 4096)}",
        f"-artifact_prefix={args.artifacts}/{args.target}-",
        "-print_final_stats=1",
        f"-seed={args.seed}",
        "-timeout=20",
        "-rss_limit_mb=2048",
    ]
    atheris.Setup(libfuzzer_args, target)
    atheris.Fuzz()  # exits the process
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CRYPTFUSE_FUZZING", "1")
    raise SystemExit(main())
