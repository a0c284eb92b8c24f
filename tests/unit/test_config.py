"""lclusterd/config.py: defaults, the config file, the command line's overrides."""

import os
import socket

import pytest

from lclusterd import config
from lclusterd.config import ConfigError


@pytest.fixture
def no_default_file(monkeypatch, tmp_path):
    """Point the default path somewhere empty: the host's /etc must not matter."""
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.conf"))


def write(tmp_path, text, name="lclusterd.conf"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults(no_default_file):
    c = config.load()
    assert c.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert c.prefix == "/lcluster"
    assert c.node_name == socket.gethostname()
    assert c.socket == "/run/lclusterd/lclusterd.sock"
    assert c.slots == (os.cpu_count() or 1)
    assert (c.stop_timeout, c.poll_interval) == (10.0, 2.0)
    assert c.rootfs is None and c.namespace is None


def test_default_path_missing_is_fine(no_default_file):
    assert config.load() == config.Config()


def test_reads_file(tmp_path):
    path = write(tmp_path, """
[lclusterd]
etcd_endpoints = http://10.0.0.1:2379
prefix = /test
node_name = node7
socket = /tmp/x.sock
slots = 3
stop_timeout = 2.5
poll_interval = 0.5
rootfs = /srv/rootfs
namespace = jobs
""")
    c = config.load(path)
    assert c.etcd_endpoints == ("http://10.0.0.1:2379",)
    assert (c.prefix, c.node_name, c.socket) == ("/test", "node7", "/tmp/x.sock")
    assert (c.slots, c.stop_timeout, c.poll_interval) == (3, 2.5, 0.5)
    assert isinstance(c.slots, int) and isinstance(c.stop_timeout, float)
    assert (c.rootfs, c.namespace) == ("/srv/rootfs", "jobs")


def test_default_path_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", write(tmp_path, "[lclusterd]\nslots = 5\n"))
    assert config.load().slots == 5


def test_other_sections_and_empty_file_are_ignored(tmp_path):
    assert config.load(write(tmp_path, "")) == config.Config()
    assert config.load(write(tmp_path, "[other]\nslots = x\n")).slots == config.Config().slots


def test_overrides_win(tmp_path):
    path = write(tmp_path, "[lclusterd]\nslots = 3\nrootfs = /srv/a\nnode_name = file\n")
    c = config.load(path, rootfs="/srv/b", slots="7", node_name=None, socket=None)
    assert (c.rootfs, c.slots, c.node_name) == ("/srv/b", 7, "file")  # None: not given
    assert c.socket == "/run/lclusterd/lclusterd.sock"


def test_override_of_endpoints(no_default_file):
    c = config.load(etcd_endpoints="http://a:2379,http://b:2379")
    assert c.etcd_endpoints == ("http://a:2379", "http://b:2379")


def test_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        config.load(write(tmp_path, "[lclusterd]\ncolour = blue\n"))
    with pytest.raises(ConfigError, match="unknown setting 'slot'"):
        config.from_mapping({"slot": "3"})


@pytest.mark.parametrize("key,value", [
    ("slots", "many"), ("slots", "2.5"), ("slots", "0"), ("slots", "-1"),
    ("stop_timeout", "soon"), ("stop_timeout", "0"), ("stop_timeout", "-1"),
    ("poll_interval", "x"), ("poll_interval", "0"),
    ("etcd_endpoints", ""), ("etcd_endpoints", " , "),
    ("prefix", "lcluster"), ("prefix", "/lcluster/"),
])
def test_bad_values(tmp_path, key, value):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, f"[lclusterd]\n{key} = {value}\n"))
    assert f"'{key}'" in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_values_mean_default(tmp_path):
    c = config.load(write(tmp_path, "[lclusterd]\nslots =\nrootfs =\nnode_name =\n"))
    assert c.slots == (os.cpu_count() or 1)
    assert c.rootfs is None and c.node_name == socket.gethostname()


def test_explicit_missing_file(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
        config.load(missing)


def test_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "this is not ini\n[lclusterd\n"))
    assert "cannot read config file" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(str(tmp_path))  # a directory


def test_endpoints_comma_list(tmp_path):
    c = config.load(write(tmp_path, "[lclusterd]\netcd_endpoints = http://a:2379, http://b:2379 ,,"
                                    "http://c:2379\n"))
    assert c.etcd_endpoints == ("http://a:2379", "http://b:2379", "http://c:2379")


def test_from_mapping_keeps_parsed_values():
    c = config.from_mapping({"etcd_endpoints": ("http://x:1",), "slots": 4})
    assert c.etcd_endpoints == ("http://x:1",) and c.slots == 4
