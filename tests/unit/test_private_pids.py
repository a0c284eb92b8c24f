"""PrivatePIDs= where the node's systemd has it (issue 12 item 1): the unit's
properties, the init shell in front of the job's `sh -c`, and the start-up
question to systemd."""

import asyncio
import dataclasses
import subprocess

import pytest

from lclusterd import core, daemon
from lclusterd.units import Unavailable
from tests.unit.test_core import job


def props(j, **kwargs):
    return dict(core.unit_properties(j, 10, **kwargs))


def test_without_private_pids_the_unit_is_as_before():
    p = props(job(uid=1000, tasks=10))
    assert "PrivatePIDs" not in p
    assert p["ExecStart"] == [("/bin/sh", ["/bin/sh", "-c", "echo hello"], False)]
    assert p["TasksMax"] == 10


def test_with_private_pids_the_job_runs_under_an_init_shell():
    p = props(dataclasses.replace(job(uid=1000, tasks=10), command="echo $X"), private_pids=True)
    assert p["PrivatePIDs"] == "yes"
    init = ('trap "exit 143" TERM; exec 3>&2 2>/dev/null; trap - TERM; '
            '(exec /bin/sh -c "$$1" 2>&3 3>&-); exit $$?')
    assert p["ExecStart"] == [("/bin/sh", ["/bin/sh", "-c", init, "/bin/sh", "echo $$X"], False)]
    assert p["TasksMax"] == 11  # the init is one of the unit's tasks


def unescaped(argv):
    """What systemd passes to exec for ExecStart= arguments (core.exec_arg)."""
    return [a.replace("$$", "$") for a in argv]


COMMANDS = ["echo \"[$0] [$1] [$#]\"", "exit 3", "kill -9 $$", "kill -TERM $$", "echo out; echo err >&2",
            "trap 'echo trapped' INT; kill -INT $$; echo after", "sleep 0 & wait; echo waited",
            "env | grep -c '^LCTEST='", "ls /proc/self/fd", "true"]


@pytest.mark.allow_io  # runs /bin/sh: a few ms each
@pytest.mark.parametrize("cmd", COMMANDS)
def test_the_init_shell_runs_a_command_as_sh_c_does(cmd):
    # Outside a PID namespace, where plain `sh -c` is the reference: output and
    # the exit status a shell sees ($?) are the same; a signal n shows as 128+n.
    ((path, argv, _),) = core.job_exec_start(cmd, private_pids=True)
    run = dict(stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
               env={"LCTEST": "1", "PATH": "/usr/bin:/bin"})
    wrapped = subprocess.run(unescaped(argv), executable=path, **run)
    plain = subprocess.run(["/bin/sh", "-c", cmd], **run)
    assert (wrapped.stdout, wrapped.stderr) == (plain.stdout, plain.stderr)
    assert wrapped.returncode == (plain.returncode if plain.returncode >= 0 else 128 - plain.returncode)


class FakeUnits:
    def __init__(self, has=True, error=None):
        self.connected, self.has, self.error, self.asked = False, has, error, []

    async def connect(self):
        if self.error:
            raise self.error
        self.connected = True

    async def service_has(self, name):
        self.asked.append(name)
        return self.has


class FakeNode:
    def __init__(self, units):
        self.units = units
        self.runner = type("R", (), {"private_pids": False})()


@pytest.mark.parametrize("has", [True, False])
def test_start_up_asks_systemd_once(has):
    node, warnings = FakeNode(FakeUnits(has)), []
    asyncio.run(daemon.ask_systemd(node, warnings))
    assert node.units.asked == ["PrivatePIDs"] and node.runner.private_pids is has
    assert warnings == []


def test_without_the_bus_jobs_run_without_it_and_status_says_so():
    node, warnings = FakeNode(FakeUnits(error=Unavailable("cannot reach the system bus: ENOENT"))), []
    asyncio.run(daemon.ask_systemd(node, warnings))
    assert node.runner.private_pids is False
    assert warnings == ["jobs run without PrivatePIDs= until a restart: cannot ask systemd "
                        "(cannot reach the system bus: ENOENT)"]
