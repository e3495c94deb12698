"""Drives AcquireLease + ReleaseLease pairs straight at a Redis, through the ledger
module (src/lib.rs: TL.ACQUIRE, then TL.RELEASE with the token granted) or, with
--lua, through the service's Redis Functions with the keys and arguments the service
sends (captured with MONITOR from a lease_pairs run). Prints pairs/s, Redis's CPU per
pair (/proc/PID/stat), commands per pair (INFO commandstats) and used_memory.

DEPTH acquires go as one pipeline, then their releases as another.

    python3 drive.py PORT SECONDS [--lua LIBRARY.lua] [--depth 12] [--tokens 100] [--tenants 1000] [--warm-up 3]
                    [--around BEFORE AFTER]
"""
import argparse
import os
import random
import subprocess
import time
import uuid

import redis

WINDOW_MS, TTL_MS, TENANT_LIMIT, TOKEN_LIMIT, PACE_BURST = 60000, 6000, 94989, 950000, 237500

cli = argparse.ArgumentParser()
cli.add_argument("port", type=int)
cli.add_argument("seconds", type=float)
cli.add_argument("--lua", metavar="LIBRARY", help="the output of `tokenlease redis-functions`")
cli.add_argument("--depth", type=int, default=12)
cli.add_argument("--tokens", type=int, default=100)
cli.add_argument("--tenants", type=int, default=1000)
cli.add_argument("--warm-up", type=float, default=3, help="seconds before the measured run")
cli.add_argument("--around", nargs=2, metavar=("BEFORE", "AFTER"),
                 help="shell commands run just before and just after the measured run")
args = cli.parse_args()

r = redis.Redis(port=args.port)
pid = int(r.info("server")["process_id"])
tick = os.sysconf("SC_CLK_TCK")
pool = [f"k{i:04d}" for i in range(args.tokens)]


class Module:
    """The ledger module: one key for the bench's space."""

    label = "module"
    key = "{bench.p0}:ledger"

    def __init__(self):
        self.digest = f"d{args.tokens}"
        r.execute_command("TL.POOL", self.digest, *pool)

    def acquire(self, tenant, nonce):
        return ["TL.ACQUIRE", self.key, tenant, nonce, TENANT_LIMIT, TOKEN_LIMIT, WINDOW_MS,
                TTL_MS, 1, PACE_BURST, 1, 1, "p0", 0, 0, 0, self.digest]

    def granted_token(self, reply):
        return reply[1].decode() if reply[0] == 1 else None

    def release(self, tenant, token, nonce):
        # The policy the service sends (as Lua.release's): failures to open, open ms,
        # successes to close, the profile's block ms, the longest quarantine ms, repeat ms.
        return ["TL.RELEASE", self.key, tenant, token, nonce, "success", 5, 30000, 2,
                0, 1000, WINDOW_MS + TTL_MS]


class Lua:
    """The service's functions, its keys under a short prefix, the space marked fresh."""

    label = "lua"
    pre = "tlp:{bench.p0}:"

    def __init__(self, library):
        self.name = library.split("name=", 1)[1].split()[0]
        r.function_load(library, replace=True)
        self.digest = f"proto{args.tokens}-{WINDOW_MS}-{TOKEN_LIMIT}-{PACE_BURST}-i4"
        fence = {"until": 0, "server": r.info("server")["run_id"]}
        r.hset(self.pre + "fence:epoch", mapping=fence)

    def acquire(self, tenant, nonce, send_pool=False):
        keys = [f"tw:{tenant}", f"lease:{nonce}", f"dem:{tenant}", "wq:p0", "wqe:p0", "wqi:p0",
                "fence:epoch"]
        argv = [WINDOW_MS, TTL_MS, 1, TENANT_LIMIT, TOKEN_LIMIT, 0, tenant, nonce, TTL_MS, 1,
                "", 15000, 0, PACE_BURST, 0, 0, self.pre, 0, 1105, self.digest]
        argv += pool if send_pool else []
        return ["FCALL", self.name + "_acquire", len(keys)] + [self.pre + k for k in keys] + argv

    def granted_token(self, reply):
        return pool[reply[1] - 1] if reply[0] == 1 else None

    def release(self, tenant, token, nonce):
        keys = [f"lease:{nonce}", f"tw:{tenant}", f"kw:{token}", f"health:{token}",
                f"health-done:{nonce}"]
        argv = ["success", tenant, token, nonce, 1, self.pre, 5, 30000, 2, "", 0, 1000, 1000,
                WINDOW_MS + TTL_MS]
        return ["FCALL", self.name + "_release", len(keys)] + [self.pre + k for k in keys] + argv


def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def commands():
    return sum(v["calls"] for v in r.info("commandstats").values())


def run(target, seconds):
    pairs, until = 0, time.time() + seconds
    while time.time() < until:
        asked = [(f"t{random.randrange(args.tenants):04d}", uuid.uuid4().hex)
                 for _ in range(args.depth)]
        p = r.pipeline(transaction=False)
        for tenant, nonce in asked:
            p.execute_command(*target.acquire(tenant, nonce))
        replies = p.execute()
        p = r.pipeline(transaction=False)
        for (tenant, nonce), reply in zip(asked, replies):
            if isinstance(target, Lua) and reply[0] == -2:  # build the pool's index
                reply = r.execute_command(*target.acquire(tenant, nonce, send_pool=True))
            token = target.granted_token(reply)
            if token is None:
                raise SystemExit(f"not granted: {reply}")
            p.execute_command(*target.release(tenant, token, nonce))
        for reply in p.execute():
            if reply[0] != 1:  # 1: released (both answer the Lua release's codes)
                raise SystemExit(f"not released: {reply}")
        pairs += args.depth
    return pairs


target = Lua(open(args.lua).read()) if args.lua else Module()
run(target, args.warm_up)
if args.around:
    subprocess.run(args.around[0], shell=True, check=True)
cpu0, cmds0, t0 = cpu_seconds(), commands(), time.time()
pairs = run(target, args.seconds)
cpu1, cmds1, t1 = cpu_seconds(), commands(), time.time()
if args.around:
    subprocess.run(args.around[1], shell=True, check=True)
# INFO counts a command once it has run: the second reading counts the first INFO.
print(f"{target.label}: {pairs} pairs in {t1 - t0:.1f} s: {pairs / (t1 - t0):.0f} pairs/s, "
      f"Redis {1e6 * (cpu1 - cpu0) / pairs:.1f} us/pair, {(cmds1 - cmds0 - 1) / pairs:.2f} cmds/pair, "
      f"used_memory {r.info('memory')['used_memory_human']}")
