"""Making the anchor libraries (Cut Cross-Entropy, Liger-Kernel) importable.

The GPU machine has no package index, so the anchors travel as pure-Python wheels in a folder
(.whl at the repository root by default). A pure-Python wheel is a zip of the package tree, so
unpacking it into a folder on sys.path is the same as installing it with --no-deps; an anchor
already installed in the environment wins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import zipfile

# distribution name in wheel file names -> module to import
ANCHOR_PACKAGES = {"cut_cross_entropy": "cut_cross_entropy", "liger_kernel": "liger_kernel"}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version))


def _pick_wheels(wheel_dir: str) -> dict[str, str]:
    """The highest version of each anchor's wheel in wheel_dir (searched recursively)."""
    best: dict[str, tuple[tuple, str]] = {}
    for root, _, files in os.walk(wheel_dir):
        for f in files:
            m = re.match(r"([A-Za-z0-9_]+)-([^-]+)-.*\.whl$", f)
            if not m or m.group(1).lower() not in ANCHOR_PACKAGES:
                continue
            name, key = m.group(1).lower(), _version_key(m.group(2))
            if name not in best or key > best[name][0]:
                best[name] = (key, os.path.join(root, f))
    return {name: path for name, (_, path) in best.items()}


def prepare_anchors(wheel_dir: str | None, unpack_dir: str) -> list[str]:
    """Unpacks the anchors that are not importable from wheel_dir; returns what it did."""
    notes = []
    if not wheel_dir or not os.path.isdir(wheel_dir):
        return notes
    for name, path in sorted(_pick_wheels(wheel_dir).items()):
        module = ANCHOR_PACKAGES[name]
        if importlib.util.find_spec(module) is not None:
            notes.append(f"{module}: using the installed package")
            continue
        target = os.path.join(unpack_dir, os.path.basename(path)[: -len(".whl")])
        if not os.path.isdir(os.path.join(target, module)):
            os.makedirs(target, exist_ok=True)
            with zipfile.ZipFile(path) as z:
                z.extractall(target)
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        notes.append(f"{module}: unpacked {os.path.basename(path)}")
    return notes


def version_of(module: str) -> str | None:
    """Version of an importable module, None when it cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    v = getattr(mod, "__version__", None)
    if v:
        return str(v)
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    # Unpacked wheels carry their metadata in <name>-<version>.dist-info next to the package.
    base = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__ or "")))
    for entry in os.listdir(base) if os.path.isdir(base) else ():
        m = re.match(rf"{module}-([^-]+)\.dist-info$", entry, re.IGNORECASE)
        if m:
            return m.group(1)
    return "unknown"
