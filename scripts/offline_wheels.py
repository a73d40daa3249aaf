"""The packages an offline GPU machine needs for `make install`, pinned to this environment's versions (`make wheels`).

    python scripts/offline_wheels.py [--python-version 3.12] [--have target-freeze.txt] > wheels/requirements.txt

Walks the requirements of lorafit, of the test tools the GPU check runs (pytest, peft) and of the build backend, as
installed here, and prints one `name==version` line for each package the target may lack. Left out: torch and its
CUDA libraries (the GPU machine keeps its own build), and, with --have (the target's `python3 -m pip freeze`), every
package whose version there satisfies what requires it here (its own requirements are then the target's business).
bitsandbytes, datasets and setuptools (pip builds `-e .` in an isolated environment) are always listed. A
requirement not installed here is printed as written (pip resolves it).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOTS = ["lorafit", "pytest", "peft", "setuptools>=68"]  # setuptools: pyproject's build backend, for an offline build
ALWAYS = {"bitsandbytes", "datasets", "setuptools"}  # setuptools: pip builds `-e .` in an isolated env
TARGET_KEEPS = ("torch", "triton", "nvidia-", "cuda-")  # a CUDA machine's own: never replaced from here


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirements_of(name: str, environment: dict[str, str]) -> list[Requirement]:
    """The installed distribution's requirements that apply on the target (extras not taken)."""
    out = []
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**environment, "extra": ""}):
            out.append(req)
    return out


def read_have(path: str | None) -> dict[str, Version]:
    """`name==version` lines of a pip freeze; other lines (editables, URLs, comments) are ignored."""
    if path is None:
        return {}
    have = {}
    for line in open(path, encoding="utf-8"):
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            have[canonicalize_name(name)] = Version(version.split(";")[0].strip())
    return have


def wheel_list(python_version: str, have: dict[str, Version]) -> list[str]:
    """The lines to print: pinned packages to download for the target."""
    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": f"{python_version}.0"}
    wanted: dict[str, list[Requirement]] = {}  # canonical name -> requirements on it
    queue = [Requirement(r) for r in ROOTS] + [Requirement(n) for n in sorted(ALWAYS)]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name.startswith(TARGET_KEEPS):
            continue
        first = name not in wanted
        wanted.setdefault(name, []).append(req)
        satisfied = name in have and all(have[name] in r.specifier for r in wanted[name])
        if first and not (satisfied and name not in ALWAYS) and installed_version(req.name):
            queue += requirements_of(req.name, environment)
    lines = []
    for name, reqs in sorted(wanted.items()):
        if name == "lorafit" or (name in have and name not in ALWAYS and all(have[name] in r.specifier for r in reqs)):
            continue
        version = installed_version(name)
        lines.append(f"{name}=={version}" if version else " ".join(str(r) for r in reqs[:1]))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}", help="the target's Python (X.Y)")
    ap.add_argument("--have", default=None, help="the target's `pip freeze`: leave out what it already satisfies")
    args = ap.parse_args(argv)
    try:
        have = read_have(args.have)
    except OSError as e:
        print(f"error: --have {args.have}: {e.strerror or e}", file=sys.stderr)
        return 2
    print("\n".join(wheel_list(args.python_version, have)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
