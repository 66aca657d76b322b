"""The layering of docs/architecture.md, checked with an AST walk over every import.

Layers (imports only go down):

1. ``errors`` (nothing from the package); ``spec``, ``af`` (stdlib + ``errors``)
2. ``sector``, ``kdf`` -- the only modules importing ``cryptography`` / ``numpy``
3. ``volume`` -- synchronous; no trio, no pyfuse3
4. ``formats/*`` -- headers -> ``Volume``; no trio, no pyfuse3
5. ``fs``, ``mount`` -- pyfuse3 + trio; ``fs`` sees a ``Volume``, never headers or keys
6. ``cli`` -- the only place for argparse, getpass, ``sys.exit`` and logging configuration

Every import counts, including function-level and ``if TYPE_CHECKING:`` ones: a type-only
import is still a dependency in the reader's head.  A new module must be given a layer in
``LAYERS`` below before it can pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cryptfuse"

# Module (relative to the package; "" is the package itself) -> rank.  An import is
# allowed when the target's rank is strictly lower, or both are inside `formats`.
# Fractions order modules that share a layer: `mount` drives `fs`, not the reverse.
LAYERS: dict[str, float] = {
    "errors": 0,
    "_gcrypt": 0.3,  # C: libgcrypt's ciphers (sector's engine) and hashes (hashes)
    "hashes": 0.5,  # hash names -> hashlib or libgcrypt digests and PBKDF2
    "spec": 1,
    "af": 1,
    "hygiene": 1,  # no core dumps, not dumpable (stdlib only)
    "keyring": 1,  # the kernel keyring's user keys, for luks2-keyring tokens (stdlib only)
    "_xts": 1.5,  # C accelerator for sector's XTS tweak chain
    "sector": 2,
    "_fastpath": 2.5,  # C READ/WRITE loop for AES-XTS/CBC volumes, Volume's range lock
    "kdf": 2,
    "foreign_crypto": 2.2,  # AES-CCM, key unwrap, BitLocker stretching for formats/
    "volume": 3,
    "benchmark": 3.5,  # `cryptfuse benchmark`: engine + KDF timings; no I/O layer above it
    "formats": 4,  # and every formats.* submodule
    "control": 4.8,  # the daemon's control socket: online reencryption (no trio/pyfuse3)
    "mountfs": 4.9,  # --mount-fs and close: mount(8), fuse2fs, /proc and /sys inspection
    "fs": 5,
    "channel": 5.2,  # the FUSE request loop: threads on /dev/fuse, VolumeFS for the rules
    "lifecycle": 5.4,  # status/resize handlers of the daemon, --lock-memory
    "mount": 5.5,
    "": 5.9,  # the facade re-exports everything: only cli and __main__ may import it
    "mount_options": 5.91,  # crypttab-style -o options of mount(8)/fstab (pure)
    "cli_input": 5.92,  # passphrase/key-file input and option types shared by subcommands
    "cli_luks": 5.95,  # the LUKS management subcommands; cli dispatches to them
    "cli_convert": 5.96,  # cryptfuse convert: reuses cli_luks's option helpers
    "cli_reencrypt": 5.97,  # reencrypt and repair: reuses cli_luks's option helpers
    "cli_close": 5.975,  # cryptfuse close
    "cli_lifecycle": 5.975,  # status and resize of a mounted volume (control socket)
    "cli_foreign": 5.98,  # tcrypt/bitlk/fvault2: mount options, dump, detect
    "cli": 6,
    "__main__": 7,
}

# Third-party distributions (top-level import names) and who may import them.
THIRD_PARTY: dict[str, set[str]] = {
    "cryptography": {"sector", "kdf", "foreign_crypto"},
    "numpy": {"sector", "kdf"},
    "trio": {"fs", "channel", "mount", "cli"},
    "pyfuse3": {"fs", "channel", "mount", "cli"},
    "tqdm": {"cli_reencrypt"},  # the reencryption progress bar
}

# The command line: the modules that may read passphrases and parse options.
CLI_MODULES = {
    "cli",
    "cli_close",
    "cli_convert",
    "cli_input",
    "cli_luks",
    "cli_reencrypt",
    "cli_lifecycle",
    "cli_foreign",
}

# Standard library modules that belong to the command line only.
CLI_ONLY_STDLIB = {"argparse", "getpass", "logging.config"}

# Modules limited to the standard library plus these package modules.
STDLIB_ONLY: dict[str, set[str]] = {
    "errors": set(),
    "hashes": {"errors", "_gcrypt"},
    "spec": {"errors", "hashes"},
    "af": {"errors", "hashes"},
    "hygiene": set(),
}

# `fs` serves a Volume: it never parses headers or handles key material.
FORBIDDEN: dict[str, set[str]] = {"fs": {"formats", "kdf", "af"}}


@dataclass(frozen=True)
class Import:
    target: str  # dotted name; package-internal ones start with "cryptfuse"
    line: int


def module_name(path: Path) -> str:
    """`cryptfuse/formats/plain.py` -> "formats.plain"; the package's __init__ -> ""."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_key(name: str) -> str:
    return "formats" if name.split(".")[0] == "formats" else name


def is_package(name: str) -> bool:
    return (PACKAGE / Path(*name.split(".")) / "__init__.py").exists() if name else True


def internal_exists(name: str) -> bool:
    """Whether *name* is a submodule: Python source, a package, or a C extension."""
    if not name:
        return True
    path = PACKAGE / Path(*name.split("."))
    return (
        path.with_suffix(".py").exists()
        or path.with_suffix(".c").exists()
        or any(path.parent.glob(f"{path.name}.*.so"))
        or is_package(name)
    )


def imports_of(path: Path) -> list[Import]:
    name = module_name(path)
    package = name if is_package(name) else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                base = node.module
                if base != "cryptfuse" and not base.startswith("cryptfuse."):
                    found.append(Import(base, node.lineno))
                    continue
                rel = base.removeprefix("cryptfuse").removeprefix(".")
            else:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond package")
                parts = parts[: len(parts) - (node.level - 1)]
                if node.module:
                    parts += node.module.split(".")
                rel = ".".join(parts)
            # `from . import fs` names a submodule; `from . import __version__` the package.
            for alias in node.names:
                sub = f"{rel}.{alias.name}" if rel else alias.name
                target = sub if internal_exists(sub) and alias.name != "*" else rel
                found.append(Import(f"cryptfuse.{target}" if target else "cryptfuse", node.lineno))
    return found


def internal(target: str) -> str | None:
    if target == "cryptfuse":
        return ""
    if target.startswith("cryptfuse."):
        return target.removeprefix("cryptfuse.")
    return None


MODULE_PATHS = sorted(PACKAGE.rglob("*.py"))
MODULES = [pytest.param(p, id=module_name(p) or "__init__") for p in MODULE_PATHS]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_package_found() -> None:
    assert {"errors", "spec", "sector", "volume"} <= {module_name(p) for p in MODULE_PATHS}


@pytest.mark.parametrize("path", MODULES)
def test_module_has_a_layer(path: Path) -> None:
    key = layer_key(module_name(path))
    assert key in LAYERS, (
        f"{rel(path)} has no layer: add {key!r} to LAYERS in tests/test_layering.py "
        "(and to docs/architecture.md)"
    )


@pytest.mark.parametrize("path", MODULES)
def test_internal_imports_go_down(path: Path) -> None:
    name = module_name(path)
    if name == "":
        return  # the facade is checked by test_facade_imports_only_errors
    rank = LAYERS.get(layer_key(name))
    if rank is None:
        pytest.skip("module without a layer (reported by test_module_has_a_layer)")
    bad = []
    for imp in imports_of(path):
        target = internal(imp.target)
        if target is None:
            continue
        key = layer_key(target)
        same_formats = layer_key(name) == "formats" and key == "formats"
        if key not in LAYERS:
            bad.append(f"line {imp.line}: imports {imp.target}, which has no layer")
        elif LAYERS[key] >= rank and not same_formats:
            bad.append(f"line {imp.line}: imports {imp.target} (layer not below {name})")
        if key in FORBIDDEN.get(name, set()):
            bad.append(f"line {imp.line}: {name} must not import {imp.target}")
    assert not bad, f"{rel(path)} breaks the layering:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", MODULES)
def test_third_party_imports(path: Path) -> None:
    name = module_name(path)
    stdlib = sys.stdlib_module_names
    bad = []
    for imp in imports_of(path):
        if internal(imp.target) is not None or imp.target == "__future__":
            continue
        top = imp.target.split(".")[0]
        if top in stdlib:
            is_cli_only = imp.target in CLI_ONLY_STDLIB or top in CLI_ONLY_STDLIB
            if is_cli_only and name not in CLI_MODULES:
                bad.append(f"line {imp.line}: {imp.target} belongs to the command line only")
            continue
        allowed = THIRD_PARTY.get(top)
        if allowed is None:
            bad.append(
                f"line {imp.line}: {imp.target} is not a declared dependency "
                "(setup.cfg install_requires and THIRD_PARTY here)"
            )
        elif name not in allowed:
            bad.append(f"line {imp.line}: {imp.target} may only be imported by {sorted(allowed)}")
    assert not bad, f"{rel(path)}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name", sorted(STDLIB_ONLY))
def test_stdlib_only_modules(name: str) -> None:
    path = PACKAGE / f"{name}.py"
    if not path.exists():
        pytest.skip(f"cryptfuse/{name}.py does not exist yet")
    bad = []
    for imp in imports_of(path):
        target = internal(imp.target)
        if target is not None:
            if target not in STDLIB_ONLY[name]:
                bad.append(f"line {imp.line}: {imp.target}")
        elif imp.target != "__future__" and imp.target.split(".")[0] not in sys.stdlib_module_names:
            bad.append(f"line {imp.line}: {imp.target} (not standard library)")
    allowed = sorted(STDLIB_ONLY[name]) or "nothing"
    assert not bad, f"{name} may import the stdlib and {allowed} only:\n  " + "\n  ".join(bad)


def _is_call_to(node: ast.Call, owner: str | None, attr: str) -> bool:
    func = node.func
    if not isinstance(func, ast.Attribute) or func.attr != attr:
        return False
    return owner is None or (isinstance(func.value, ast.Name) and func.value.id == owner)


@pytest.mark.parametrize("path", MODULES)
def test_only_cli_exits_and_configures_logging(path: Path) -> None:
    """Library code raises; only the CLI turns errors into exit codes and sets up logging."""
    if module_name(path) in CLI_MODULES:
        return
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        if _is_call_to(node, "sys", "exit"):
            bad.append(f"line {node.lineno}: sys.exit()")
        elif _is_call_to(node, "logging", "basicConfig"):
            bad.append(f"line {node.lineno}: logging.basicConfig()")
        elif _is_call_to(node, None, "addHandler"):
            bad.append(f"line {node.lineno}: addHandler()")
    assert not bad, f"{rel(path)} (cli only):\n  " + "\n  ".join(bad)


def test_facade_imports_only_errors() -> None:
    """At run time `cryptfuse/__init__.py` imports errors; the rest is lazy (PEP 562)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    runtime: list[str] = []
    for node in tree.body:  # module level only; `if TYPE_CHECKING:` blocks are skipped
        if isinstance(node, ast.ImportFrom):
            runtime.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            runtime.extend(alias.name for alias in node.names)
    internal_ = {m for m in runtime if m.startswith(".")}
    assert internal_ <= {".errors"}, internal_
    third = {m for m in runtime if not m.startswith(".")}
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in third), third


def test_import_cryptfuse_is_light() -> None:
    """`import cryptfuse` must not load the crypto stack, trio or pyfuse3 (FUSE not needed)."""
    heavy = ["pyfuse3", "trio", "cryptography", "numpy"]
    code = f"import sys, cryptfuse; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"import cryptfuse loaded: {out.stdout.strip()}"


def test_shim_imports_cli_only() -> None:
    shim = ROOT / "cryptfuse.py"
    if not shim.exists():
        pytest.skip("cryptfuse.py shim does not exist yet")
    targets = set()
    for node in ast.walk(ast.parse(shim.read_text())):
        if isinstance(node, ast.ImportFrom):
            targets.add(node.module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    assert targets == {"cryptfuse.cli"}, targets
