"""The installed releases against requirements.lock: write the lock, or run a command and name what changed.

    python .ci/drift.py requirements.lock --write        # freeze this interpreter's packages into the lock
    python .ci/drift.py requirements.lock -- CMD ARGS..   # run CMD; print the releases that differ from the lock

Run with the interpreter of the environment to read (make lock, make test-latest). With a command, the exit
status is the command's: a failure is printed with the packages whose release is not the lock's, so that an
upstream break is named by the release that brought it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# The exact releases `make test`, `make demo`, CI and the benches install (pip constraints: pip install -c).
# Written by `make lock` from the newest releases pyproject.toml's ranges allow; docs/dependencies.md.
"""
# Not constraints: the project itself (installed editable) and what pip brings into every venv.
SKIP = {"edge-lora"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of this interpreter's distributions, local labels (torch's +cpu) dropped: a
    constraint `==2.13.0` matches 2.13.0+cpu, and the lock then holds on a platform whose wheel has no label."""
    found = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name not in SKIP:
            found[name] = dist.version.split("+")[0]
    return found


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def write_lock(path: Path) -> None:
    pins = installed()
    path.write_text(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"{path}: {len(pins)} releases")


def differences(lock: dict[str, str], now: dict[str, str]) -> list[str]:
    lines = [f"{n} {lock[n]} → {now[n]}" for n in sorted(now) if n in lock and lock[n] != now[n]]
    lines += [f"{n} {now[n]} (not in the lock)" for n in sorted(now) if n not in lock]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.exit("usage: drift.py LOCK --write | drift.py LOCK -- CMD ARGS...")
    path = Path(argv[0])
    if argv[1] == "--write":
        write_lock(path)
        return 0
    if argv[1] != "--" or len(argv) < 3:
        sys.exit("usage: drift.py LOCK --write | drift.py LOCK -- CMD ARGS...")
    changed = differences(read_lock(path), installed())
    print(f"releases that differ from {path}: " + ("; ".join(changed) if changed else "none"), flush=True)
    status = subprocess.call(argv[2:])
    if status:
        named = "; ".join(changed) if changed else f"none differ from {path}: the break is not upstream's"
        print(f"UPSTREAM BREAK? `{' '.join(argv[2:])}` failed (exit {status}) under the newest releases; {named}")
    else:
        print(f"the newest releases pass: `{' '.join(argv[2:])}`")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
