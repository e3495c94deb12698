#!/usr/bin/env python3
"""Checks deploy/compose.yaml without Docker (`docker compose config` is not available
everywhere CI runs): two tokenlease replicas, Postgres, Redis and Prometheus; every
setting a replica is given exists (`tokenlease serve --help` lists them); the ports
published; the alert rules mounted where the Prometheus config loads them; and the
scrape config targeting both replicas' metrics ports.

Usage: python3 deploy/check_compose.py target/debug/tokenlease   (needs PyYAML; exit 1
on a problem)
"""
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REPLICAS = ("tokenlease-1", "tokenlease-2")
GRPC_PORT, METRICS_PORT = 50051, 9464
# Read by libraries, not tokenlease's settings.
STANDARD_VARIABLES = {"RUST_LOG", "DATABASE_URL", "REDIS_URL"}
STANDARD_PREFIXES = ("OTEL_",)


def known_settings(binary):
    """Environment variables of `serve --help`: `(TOKENLEASE_…)` per setting, and the
    dotted keys of its "unset by default" line (`<id>` stands for any id)."""
    help_text = subprocess.run(
        [binary, "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    exact = set(re.findall(r"\((TOKENLEASE_[A-Z0-9_]+)\)", help_text))
    patterns = []
    also = re.search(r"Also, unset by default: (.*)", help_text)
    if not exact or not also:
        sys.exit(f"{binary} serve --help lists no settings: is it tokenlease?")
    for item in re.sub(r"\([^)]*\)", "", also.group(1)).split(","):
        key = item.strip().rstrip(".")
        if not key or key.upper() == key:  # DATABASE_URL, REDIS_URL
            continue
        env = re.escape("TOKENLEASE_" + key.upper().replace(".", "__"))
        patterns.append(re.compile(env.replace("<ID>", "[A-Z0-9_]+") + "$"))
    return exact, patterns


def environment_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def published(service):
    """(host address, host port, container port) of each published port."""
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append((entry.get("host_ip", "0.0.0.0"), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        ports.append((host_ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return ports


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    problems = []
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose.get("services") or {}
    expected = set(REPLICAS) | {"postgres", "redis", "prometheus"}
    missing = expected - set(services)
    if missing:
        problems.append(f"compose.yaml: missing services {sorted(missing)}")

    exact, patterns = known_settings(sys.argv[1])
    host_ports = {}
    for name in REPLICAS:
        service = services.get(name) or {}
        env = environment_of(service)
        for variable in env:
            known = (
                variable in exact
                or variable in STANDARD_VARIABLES
                or variable.startswith(STANDARD_PREFIXES)
                or any(p.match(variable) for p in patterns)
            )
            if not known:
                problems.append(f"compose.yaml: {name} sets {variable}, which is no setting of `tokenlease serve --help`")
        for needed in ("DATABASE_URL", "REDIS_URL"):
            if not str(env.get(needed) or "").strip():
                problems.append(f"compose.yaml: {name} has no {needed}: replicas must share Postgres and Redis")
        if not any(re.match(r"TOKENLEASE_ENCRYPTION__(KEYS__|KEY_FILE)", v) for v in env):
            problems.append(f"compose.yaml: {name} has no master key (TOKENLEASE_ENCRYPTION__KEYS__<ID> or __KEY_FILE)")
        if not service.get("build") and not service.get("image"):
            problems.append(f"compose.yaml: {name} has neither build nor image")
        targets = set()
        for host_ip, host_port, target in published(service):
            targets.add(target)
            if host_port in host_ports:
                problems.append(f"compose.yaml: host port {host_port} published by {host_ports[host_port]} and {name}")
            host_ports[host_port] = name
            tls = any(v.startswith("TOKENLEASE_TLS__") for v in env)
            if target == GRPC_PORT and not tls and host_ip not in ("127.0.0.1", "::1", "localhost"):
                problems.append(f"compose.yaml: {name} publishes plaintext gRPC on {host_ip}:{host_port}; bind 127.0.0.1 or configure TLS")
        for port in (GRPC_PORT, METRICS_PORT):
            if port not in targets:
                problems.append(f"compose.yaml: {name} does not publish container port {port}")

    prometheus = services.get("prometheus") or {}
    mounts = {}
    for volume in prometheus.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        mounts[target] = (DEPLOY / source).resolve()
    config_mount = mounts.get("/etc/prometheus/prometheus.yml")
    if config_mount is None or not config_mount.is_file():
        problems.append("compose.yaml: prometheus does not mount an existing prometheus.yml at /etc/prometheus/prometheus.yml")
    else:
        config = yaml.safe_load(config_mount.read_text())
        for rule_file in config.get("rule_files") or []:
            in_container = rule_file if rule_file.startswith("/") else f"/etc/prometheus/{rule_file}"
            source = mounts.get(in_container)
            if source is None or not source.is_file():
                problems.append(f"prometheus.yml: rule file {rule_file} is not mounted into the container")
            elif source != (DEPLOY / "prometheus" / "tokenlease.rules.yml").resolve():
                problems.append(f"prometheus.yml: {rule_file} is not deploy/prometheus/tokenlease.rules.yml")
        if not config.get("rule_files"):
            problems.append("prometheus.yml: loads no rule file")
        scraped = {
            target
            for job in config.get("scrape_configs") or []
            for static in job.get("static_configs") or []
            for target in static.get("targets") or []
        }
        for name in REPLICAS:
            if f"{name}:{METRICS_PORT}" not in scraped:
                problems.append(f"prometheus.yml: does not scrape {name}:{METRICS_PORT}")

    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"compose.yaml: {len(services)} services, both replicas' settings exist, ports, rules and scrape targets are right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
