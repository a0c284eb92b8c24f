"""The unit-test I/O guard (conftest.py) cannot be swallowed by the code under
test: issue 9 item 16. Node.run catches Exception to retry a failed pass; a
guard raising AssertionError there let a unit test that touched etcd pass."""

import asyncio
import os
import socket
import subprocess

import pytest


def swallowing(action):
    """What Node.run's retry loop does with an error: log it and go on."""
    try:
        action()
    except Exception:  # noqa: BLE001 - the point of the test
        return "swallowed"
    return "returned"


@pytest.mark.parametrize("action", [
    lambda: socket.create_connection(("127.0.0.1", 9)),
    lambda: subprocess.run(["true"]),
    lambda: os.system("true"),
    lambda: os.fork(),
    lambda: socket.socket(socket.AF_UNIX).connect("/run/systemd/private"),
], ids=["tcp", "subprocess", "system", "fork", "system-socket"])
def test_the_guard_escapes_except_exception(action):
    with pytest.raises(BaseException) as caught:
        swallowing(action)
    assert not isinstance(caught.value, Exception)
    assert "unit tests must not touch" in str(caught.value)


def test_the_guard_escapes_an_asyncio_task_that_catches_exception():
    async def pass_that_logs_and_retries():
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, socket.create_connection, ("127.0.0.1", 2379))
        except Exception:  # noqa: BLE001
            return "swallowed"
    with pytest.raises(BaseException) as caught:
        asyncio.run(pass_that_logs_and_retries())
    assert "unit tests must not touch the network" in str(caught.value)


def test_the_etcd_client_is_refused_past_except_exception():
    import etcd3
    with pytest.raises(BaseException) as caught:
        swallowing(lambda: etcd3.client("127.0.0.1", 2379))
    assert "unit tests must not touch etcd" in str(caught.value)


@pytest.mark.allow_io("subprocess")
def test_a_marked_test_may_fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
