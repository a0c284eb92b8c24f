"""What the jobs' sandbox costs per unit start: N transient services started
over D-Bus (16 in flight, as the node does) and waited for, with a bare unit,
the spine's sandbox and the default properties (core.unit_properties), in a
container booted with systemd. Not a test; run it by hand:

    /usr/bin/python3 -m tests.system.bench_sandbox [N]
"""

import sys
from pathlib import Path

from tests.system import container as ct

REPO = Path(__file__).resolve().parents[2]

BENCH = r'''
import asyncio, sys, time
sys.path.insert(0, "/mnt/src")
from lclusterd import core
from lclusterd.units import Units

N = int(sys.argv[1])
SPINE = ("Description", "ExecStart", "RemainAfterExit", "Slice", "Environment", "KillSignal",
         "TimeoutStopUSec", "PrivateTmp", "PrivateNetwork", "NoNewPrivileges", "ProtectSystem",
         "ProtectHome", "User", "Group")
KINDS = {
    "bare": lambda j: [("Description", "x"), ("ExecStart", [("/bin/true", ["/bin/true"], False)]),
                       ("RemainAfterExit", True), ("Slice", core.JOB_SLICE)],
    "spine sandbox": lambda j: [p for p in core.unit_properties(j, 5) if p[0] in SPINE],
    "default": lambda j: core.unit_properties(j, 5),
    "default without ProtectKernelTunables": lambda j: [
        p for p in core.unit_properties(j, 5) if p[0] != "ProtectKernelTunables"],
}

async def batch(units, props):
    jobs = [core.new_job("true", 1000, 1000, "alice", time.time()) for _ in range(N)]
    start = time.monotonic()
    await asyncio.gather(*(units.start(j, props(j)) for j in jobs))
    pending = {j.uuid for j in jobs}
    while pending:
        for uuid in list(pending):
            status = await units.status(uuid)
            if status and status.exit_code:
                pending.discard(uuid)
    took = time.monotonic() - start
    await asyncio.gather(*(units.release(j.uuid) for j in jobs))
    return took

async def main():
    units = Units()
    await units.connect()
    for kind, props in KINDS.items():
        took = await batch(units, props)
        print(f"{kind:40} {N / took:6.0f} units/s {1000 * took / N:7.1f} ms/unit", flush=True)

asyncio.run(main())
'''


def main(argv):
    n = int(argv[0]) if argv else 200
    ct.check_host()
    with ct.Container(ct.unique_name("lcbench"), ct.build_rootfs(),
                      binds_ro={str(REPO): "/mnt/src"}) as c:
        c.run("useradd alice")
        for _ in range(2):
            print(c.run(f"python3 - {n}", input=BENCH, timeout=600).stdout, end="", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
