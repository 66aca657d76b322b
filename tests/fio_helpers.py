"""fio as an external oracle (tests/test_fio.py, tests/test_load.py).

fio writes blocks that carry a header and a crc32c of their contents
(``verify=crc32c``) and reads them back (``verify_backlog``: while it goes on, not
only at the end); any block that comes back different, or from the wrong offset, is
an error of the job.  ``run_fio`` runs a job file with JSON output and returns the
parsed report after checking that no job failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


def need_fio() -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio not installed (Debian: fio)")


def job_file(
    path: Path, global_options: dict[str, object], jobs: dict[str, dict[str, object]]
) -> Path:
    """Write an fio job file: a [global] section and one section per job."""
    lines = ["[global]", *(f"{k}={v}" for k, v in global_options.items())]
    for name, options in jobs.items():
        lines += ["", f"[{name}]", *(f"{k}={v}" for k, v in options.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_fio(jobfile: Path, *args: str, timeout: float = 300, check: bool = True) -> dict[str, Any]:
    """Run fio on *jobfile*; the JSON report (jobs whose error is not 0 fail the test)."""
    proc = subprocess.run(
        ["fio", "--output-format=json", *args, str(jobfile)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=jobfile.parent,  # where fio leaves its verify state files, if any
    )
    start = proc.stdout.find("{")
    report: dict[str, Any] = json.loads(proc.stdout[start:]) if start >= 0 else {"jobs": []}
    report["returncode"] = proc.returncode
    report["stderr"] = proc.stderr
    if check:
        failed = {j["jobname"]: j["error"] for j in report["jobs"] if j["error"]}
        assert proc.returncode == 0 and not failed and report["jobs"], (
            f"fio failed ({proc.returncode}): {failed} {proc.stderr.strip()[-2000:]}"
        )
    return report


def io_bytes(report: dict[str, Any], direction: str) -> int:
    """Bytes the report's jobs transferred in *direction* ("read" or "write")."""
    return sum(int(j[direction]["io_bytes"]) for j in report["jobs"])
