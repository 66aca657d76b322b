"""Fuzzing in ``make test``: the seeds, every input that once crashed, a short run.

The targets and their contract are in tests/fuzz_targets.py (any input: accepted,
or a one-line CryptfuseError; every FUSE request: exactly one well-formed answer,
no exception escaping a handler).  Here:

* every seed (from the shared corpus and hand-written) and every regression input
  (``tests/fuzz_regressions/TARGET/``) goes through its target in-process;
* one coverage-guided atheris run of all targets together (``FUZZ_SECONDS``,
  default 3 s) in a subprocess: libFuzzer's harness exits the process.

``make fuzz`` runs each target for longer (tests/fuzz_run.py; docs/reliability.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fuzz_targets
import pytest

TARGETS = [name for name in fuzz_targets.TARGETS if name != "all"]


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_regressions(target: str) -> None:
    run = fuzz_targets.TARGETS[target]
    inputs = [("seed", data) for data in fuzz_targets.seeds(target)]
    inputs += list(fuzz_targets.regressions(target))
    if not inputs and not fuzz_targets.CORPUS.is_dir():
        pytest.skip(f"corpus not found at {fuzz_targets.CORPUS} (the seeds of {target})")
    assert inputs, f"no seeds for {target}"
    try:
        for name, data in inputs:
            try:
                run(data)
            except Exception as exc:
                raise AssertionError(f"{target} input {name} ({data[:60]!r}...): {exc!r}") from exc
    finally:
        fuzz_targets.close_channel()


def test_regressions_exist_for_fixed_crashes() -> None:
    found = {t: [n for n, _ in fuzz_targets.regressions(t)] for t in TARGETS}
    assert any(found.values())


def test_short_coverage_guided_run(tmp_path: Path, repo: Path) -> None:
    pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")
    if os.environ.get("CRYPTFUSE_SANITIZER"):
        pytest.skip("libFuzzer's runtime inside a sanitizer-preloaded interpreter: not run")
    seconds = os.environ.get("FUZZ_SECONDS", "3")
    result = subprocess.run(
        [sys.executable, str(repo / "tests" / "fuzz_run.py"), "all", "--seconds", seconds,
         "--corpus", str(tmp_path / "corpus"), "--artifacts", str(tmp_path)],
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    tail = result.stderr.decode(errors="replace")[-4000:]
    crashes = sorted(p.name for p in tmp_path.glob("all-*"))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{tail}"
    assert "Done" in tail, tail
