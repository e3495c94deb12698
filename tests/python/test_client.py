#!/usr/bin/env python3
"""Polyglot check: a Python client generated from proto/ talks to a real server.

Generates stubs with `python -m grpc_tools.protoc` into a temporary folder, starts
`tokenlease serve` (the built debug binary; TOKENLEASE_BIN overrides) in a temporary
data folder on a free port, reads the bootstrap admin key from `<data_dir>/admin.key`,
configures an upstream, pool, token, tier, tenants and a worker key through
AdminService, leases with the worker key, and checks the error statuses a client sees.

Run: python tests/python/test_client.py   (exit 1 on a failure)
"""
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from tokenlease_server import ROOT, free_port, start_server, wait_for_admin_key

SECRET = "py-1-23-SECRET-TOKEN"


def generate_stubs(out):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"),
               f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", *protos]
    subprocess.run(command, check=True, cwd=ROOT)
    sys.path.insert(0, str(out))


def wait_ready(server, data_dir, port):
    key = wait_for_admin_key(server, Path(data_dir) / "admin.key", port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel, key


def bearer(key):
    return (("authorization", f"Bearer {key}"),)


def secs(n):
    return duration_pb2.Duration(seconds=n)


def expect_status(code, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
        assert error.details(), "a status without a message"
        return error
    raise AssertionError(f"expected {code}, the call succeeded")


def run(channel, admin_key):
    from tokenlease.v1 import admin_pb2, admin_pb2_grpc, lease_pb2, lease_pb2_grpc

    admin = admin_pb2_grpc.AdminServiceStub(channel)
    lease = lease_pb2_grpc.LeaseServiceStub(channel)
    auth = bearer(admin_key)
    results = []

    def check(name, body):
        try:
            body()
            results.append((name, None))
            print(f"ok    {name}")
        except Exception:  # noqa: BLE001 - report every failing check, then fail
            results.append((name, traceback.format_exc()))
            print(f"FAIL  {name}\n{traceback.format_exc()}")

    state = {}

    def configure():
        admin.CreateUpstream(admin_pb2.CreateUpstreamRequest(upstream=admin_pb2.Upstream(
            id="pyup", display_name="python upstream", limit_per_window=100, window=secs(60),
            safety_margin=0.05, block_duration=secs(60))), metadata=auth)
        admin.CreatePool(admin_pb2.CreatePoolRequest(pool=admin_pb2.Pool(id="pypool", upstream_id="pyup")),
                         metadata=auth)
        token = admin.CreateToken(admin_pb2.CreateTokenRequest(token=admin_pb2.Token(
            id="pytok", upstream_id="pyup", secret=SECRET, pool_id="pypool")), metadata=auth).token
        assert token.secret == "", "CreateToken must not echo the secret"
        admin.CreateTier(admin_pb2.CreateTierRequest(tier=admin_pb2.Tier(
            id="pytier", guaranteed_per_window=10, burst_per_window=10,
            shared_access=admin_pb2.SHARED_ACCESS_NORMAL, weight=1.0)), metadata=auth)
        for tenant in ("pyacme", "pyother"):
            admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(
                id=tenant, tier_id="pytier", pool_id="pypool")), metadata=auth)
        created = admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(api_key=admin_pb2.ApiKey(
            display_name="python worker", role=admin_pb2.API_KEY_ROLE_WORKER, tenant_ids=["pyacme"])),
            metadata=auth)
        assert created.secret.startswith("tl_"), "a worker key is returned once"
        state["worker"] = bearer(created.secret)

    def lease_and_release():
        answer = lease.AcquireLease(lease_pb2.AcquireLeaseRequest(
            tenant_id="pyacme", request_kind=lease_pb2.REQUEST_KIND_ORDER_SYNC), metadata=state["worker"])
        assert answer.WhichOneof("result") == "lease", answer
        granted = answer.lease
        assert granted.token == SECRET and granted.token_id == "pytok"
        assert granted.quota.tenant_limit == 20 and granted.quota.tenant_remaining == 19
        assert granted.quota.token_remaining == 94  # 100 − 5 % margin − this lease
        release = lease_pb2.ReleaseLeaseRequest(lease_id=granted.lease_id,
                                                outcome=lease_pb2.RELEASE_OUTCOME_SUCCESS,
                                                upstream_latency=duration_pb2.Duration(nanos=120_000_000))
        assert lease.ReleaseLease(release, metadata=state["worker"]).already_released is False
        assert lease.ReleaseLease(release, metadata=state["worker"]).already_released is True
        state["lease_id"] = granted.lease_id

    def error_statuses():
        request = lease_pb2.AcquireLeaseRequest(tenant_id="pyacme")
        expect_status(grpc.StatusCode.UNAUTHENTICATED, lease.AcquireLease, request)
        expect_status(grpc.StatusCode.UNAUTHENTICATED, lease.AcquireLease, request,
                      metadata=bearer("tl_not_a_key"))
        expect_status(grpc.StatusCode.UNAUTHENTICATED, admin.ListTenants, admin_pb2.ListTenantsRequest())
        expect_status(grpc.StatusCode.PERMISSION_DENIED, lease.AcquireLease,
                      lease_pb2.AcquireLeaseRequest(tenant_id="pyother"), metadata=state["worker"])
        expect_status(grpc.StatusCode.PERMISSION_DENIED, admin.ListTenants,
                      admin_pb2.ListTenantsRequest(), metadata=state["worker"])
        error = expect_status(grpc.StatusCode.INVALID_ARGUMENT, lease.AcquireLease,
                              lease_pb2.AcquireLeaseRequest(tenant_id="Not An Id"), metadata=auth)
        assert "tenant_id" in error.details(), error.details()
        expect_status(grpc.StatusCode.NOT_FOUND, lease.AcquireLease,
                      lease_pb2.AcquireLeaseRequest(tenant_id="nobody"), metadata=auth)
        expect_status(grpc.StatusCode.NOT_FOUND, lease.ReleaseLease,
                      lease_pb2.ReleaseLeaseRequest(lease_id="pyup.pyacme.pytok." + "0" * 32,
                                                    outcome=lease_pb2.RELEASE_OUTCOME_SUCCESS),
                      metadata=state["worker"])
        expect_status(grpc.StatusCode.FAILED_PRECONDITION, lease.ReleaseLease,
                      lease_pb2.ReleaseLeaseRequest(lease_id=state["lease_id"],
                                                    outcome=lease_pb2.RELEASE_OUTCOME_NOT_USED),
                      metadata=state["worker"])

    check("admin configures upstream, pool, token, tier, tenants and a worker key", configure)
    if "worker" in state:
        check("worker leases the token and releases it once", lease_and_release)
    if "lease_id" in state:
        check("errors are UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION",
              error_statuses)
    failed = sum(1 for _, error in results if error)
    print(f"{len(results) - failed} passed, {failed + 3 - len(results)} failed")
    return failed == 0 and len(results) == 3


def main():
    with tempfile.TemporaryDirectory(prefix="tokenlease-py-") as tmp:
        gen = Path(tmp) / "gen"
        gen.mkdir()
        generate_stubs(gen)
        data_dir = Path(tmp) / "data"
        port = free_port()
        server = start_server(port, data_dir=data_dir)
        try:
            channel, admin_key = wait_ready(server, data_dir, port)
            ok = run(channel, admin_key)
            channel.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if server.returncode != 0:
            print(f"tokenlease serve exited with {server.returncode} after SIGTERM")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
