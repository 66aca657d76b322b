"""bench/run.py's arithmetic: medians of rounds, paired per-round ratios, the report.

The benchmark itself needs root, qemu-storage-daemon and ~15 minutes; what it makes of
its figures is pure and checked here with made-up samples.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


B = _load()
WL = "4 KiB rand read, 1 thread (IOPS)"


def _bench(tmp_path: Path, rounds: int) -> Any:
    args = B.parse_args(["--rounds", str(rounds), "--cryptfuse", "true"])
    bench = B.Bench(args, tmp_path, contextlib.ExitStack())
    bench.containers = [
        B.Container("LUKS1 test", "luks1", "/x.img", "/k", 2 << 20, 1 << 30, 512, 1)
    ]
    bench.versions = {}
    return bench


def _add(bench: Any, target: str, values: list[float | None]) -> None:
    samples = bench.samples.setdefault(("luks1", WL, target), [])
    for v in values:
        samples.append(B.Result(value=v) if v is not None else B.Result(note="failed: x"))


def test_medians_and_paired_ratios(tmp_path: Path) -> None:
    bench = _bench(tmp_path, 3)
    # qsd is slow in round 2, cryptfuse in round 3: paired ratios 2.0, 4.0, 1.0
    _add(bench, "cryptfuse", [10_000, 8_000, 5_000])
    _add(bench, "qsd", [5_000, 2_000, 5_000])
    _add(bench, "raw", [20_000, 16_000, 10_000])
    bench.summarise()
    assert bench.results[("luks1", WL, "cryptfuse")].value == 8_000
    assert bench.results[("luks1", WL, "qsd")].value == 5_000
    assert bench.ratios("luks1", WL, "cryptfuse", "qsd") == [2.0, 4.0, 1.0]
    # the median of the paired ratios (2.0), not the ratio of the medians (1.6)
    assert B.ratio([2.0, 4.0, 1.0]) == "2.00× (1.00–4.00)"
    text = B.report(bench, [], datetime.datetime(2026, 12, 1), 60.0)
    assert f"| LUKS1 512 B | {WL} | 8,000 | 5,000 | 16,000 | 2.00× (1.00–4.00) |" in text
    assert "2.00× qsd (target ≥ 1.5×): met, met in 2 of 3 rounds" in text


def test_failed_rounds_are_left_out(tmp_path: Path) -> None:
    bench = _bench(tmp_path, 2)
    _add(bench, "cryptfuse", [None, 9_000])
    _add(bench, "qsd", [3_000, 6_000])
    bench.summarise()
    assert bench.results[("luks1", WL, "cryptfuse")].value == 9_000
    assert bench.ratios("luks1", WL, "cryptfuse", "qsd") == [1.5]
    text = B.report(bench, [], datetime.datetime(2026, 12, 1), 60.0)
    assert "1.50× qsd (target ≥ 1.5×): met\n" in text  # one round: no "k of n"


def test_all_rounds_failed(tmp_path: Path) -> None:
    bench = _bench(tmp_path, 2)
    _add(bench, "cryptfuse", [None, None])
    bench.summarise()
    res = bench.results[("luks1", WL, "cryptfuse")]
    assert res.value is None and res.note == "failed: x"
    assert B.ratio([]) == "–"


@pytest.mark.parametrize("text", ["0", "-2"])
def test_rounds_must_be_positive(text: str) -> None:
    with pytest.raises(SystemExit):
        B.parse_args(["--rounds", text])


def test_rounds_default() -> None:
    assert B.parse_args([]).rounds is None  # Bench picks 3 (1 with --quick)
    assert isinstance(B.parse_args([]), argparse.Namespace)
