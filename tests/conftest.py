"""Settings shared by every level of the suite."""


def pytest_configure(config):
    # No pytest.ini: markers are registered here.
    config.addinivalue_line(
        "markers",
        "allow_io(*kinds): let a unit test touch the system (kinds: subprocess, "
        "socket, etcd, dbus; none given means all). See tests/unit/conftest.py.")
