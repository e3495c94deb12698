"""Starting `tokenlease serve` for the Python checks (test_client.py, test_readme.py).

The built debug binary (TOKENLEASE_BIN overrides), embedded mode, on a free local port,
with no inherited TOKENLEASE_/OTEL_ settings nor DATABASE_URL/REDIS_URL, so that a
developer's environment cannot change what the checks see.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def binary():
    explicit = os.environ.get("TOKENLEASE_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    return target / "debug" / "tokenlease"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, cwd=None, data_dir=None):
    """`tokenlease serve` on 127.0.0.1:`port`, its data in `data_dir` (default: the
    `tokenlease-data` folder of `cwd`, as the README's first command has it)."""
    exe = binary()
    if not exe.exists():
        sys.exit(f"{exe} does not exist: run `cargo build` first (or set TOKENLEASE_BIN)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKENLEASE_", "OTEL_")) and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"TOKENLEASE_LISTEN": f"127.0.0.1:{port}", "TOKENLEASE_METRICS__LISTEN": "",
                "RUST_LOG": "warn"})
    if data_dir is not None:
        env["TOKENLEASE_DATA_DIR"] = str(data_dir)
    return subprocess.Popen([str(exe), "serve"], cwd=cwd, env=env)


def wait_for_admin_key(server, key_file, port, timeout_s=30):
    """The bootstrap admin key, once the server wrote it and accepts connections on
    `port`; exits the check when the server dies or is not up within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tokenlease serve exited with {server.returncode}")
        key = Path(key_file).read_text().strip() if Path(key_file).exists() else ""
        if key:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return key
        time.sleep(0.1)
    sys.exit(f"tokenlease serve did not come up within {timeout_s} s")
