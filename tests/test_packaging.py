"""Packaging and project-level checks: metadata, entry point, public API, README, CI."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import re
from pathlib import Path

import pytest

import cryptfuse

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg missing"
    return cfg


def lines(value: str) -> list[str]:
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", cryptfuse.__version__)
    assert cryptfuse.__version__ == "0.1.0"


def test_installed_metadata_matches() -> None:
    try:
        installed = importlib.metadata.version("cryptfuse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cryptfuse is not installed (run `make setup`)")
    assert installed == cryptfuse.__version__


def test_console_script_declared(setup_cfg: configparser.ConfigParser) -> None:
    scripts = lines(setup_cfg["options.entry_points"]["console_scripts"])
    assert "cryptfuse = cryptfuse.cli:main" in scripts


def test_console_script_target_exists() -> None:
    """`cryptfuse.cli:main` is a function (checked on the source, without running it)."""
    cli = ROOT / "cryptfuse" / "cli.py"
    assert cli.exists(), "cryptfuse/cli.py (the console script's module) is missing"
    tree = ast.parse(cli.read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "main" in names


def test_console_script_installed() -> None:
    try:
        importlib.metadata.distribution("cryptfuse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cryptfuse is not installed (run `make setup`)")
    found = importlib.metadata.entry_points(group="console_scripts", name="cryptfuse")
    assert [ep.value for ep in found] == ["cryptfuse.cli:main"]


def test_dependencies(setup_cfg: configparser.ConfigParser) -> None:
    options = setup_cfg["options"]
    assert options["python_requires"].strip() == ">=3.11"
    names = {re.split(r"[<>=!~ ;\[]", req)[0] for req in lines(options["install_requires"])}
    assert {"pyfuse3", "trio", "cryptography", "numpy"} <= names
    test_extra = set(lines(setup_cfg["options.extras_require"]["test"]))
    assert {"pytest", "pytest-trio", "hypothesis", "mypy", "ruff"} <= test_extra


def test_every_package_is_listed(setup_cfg: configparser.ConfigParser) -> None:
    """A subpackage missing from `packages` would be absent from a non-editable install."""
    listed = {p.strip() for p in setup_cfg["options"]["packages"].split(",")}
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "cryptfuse").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk == listed


def test_public_api_resolves() -> None:
    assert len(cryptfuse.__all__) == len(set(cryptfuse.__all__))
    missing = [name for name in cryptfuse.__all__ if not hasattr(cryptfuse, name)]
    assert not missing
    assert issubclass(cryptfuse.WrongPassphraseError, cryptfuse.CryptfuseError)
    assert cryptfuse.parse_cipher_spec("aes-xts-plain64") == cryptfuse.CipherSpec(
        cipher="aes", keycount=1, chainmode="xts", ivmode="plain64", ivopts=None
    )


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError):
        _ = cryptfuse.no_such_name  # type: ignore[attr-defined]


def test_makefile_targets() -> None:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))
    assert {"setup", "test", "demo", "lint", "bench", "clean"} <= targets


def test_readme_quick_start_is_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"```\w*\n(.*?)```", section.group(1), flags=re.S)
    commands = [line.strip() for block in blocks for line in lines(block)]
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test() -> None:
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK)
    text = run.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    assert re.search(r"^make test$", text, flags=re.M)


def test_examples_are_executable() -> None:
    for script in ("examples/demo.sh",):
        path = ROOT / script
        assert path.exists(), script
        assert os.access(path, os.X_OK), f"{script} is not executable"
