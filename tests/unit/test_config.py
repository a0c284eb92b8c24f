"""lclusterd/config.py: defaults, the config file, the command line's overrides."""

import dataclasses
import os
import socket

import pytest

from lclusterd import config, daemon
from lclusterd.config import ConfigError


@pytest.fixture(autouse=True)
def no_packaged_certificates(monkeypatch, tmp_path):
    """The package's etcd certificates: absent, whatever the host has."""
    monkeypatch.setattr(config, "DEFAULT_TLS", {k: str(tmp_path / "etcd" / os.path.basename(v))
                                                for k, v in config.DEFAULT_TLS.items()})


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


# -- contract C8: what one user or one flood may take ---------------------------

def test_quota_and_connection_defaults(no_default_file):
    c = config.load()
    assert (c.max_queued_per_user, c.max_connections, c.max_connections_per_uid) == (10000, 4096, 256)


def test_quota_and_connections_from_file(tmp_path):
    c = config.load(write(tmp_path, "[lclusterd]\nmax_queued_per_user = 50\n"
                                    "max_connections = 100\nmax_connections_per_uid = 10\n"))
    assert (c.max_queued_per_user, c.max_connections, c.max_connections_per_uid) == (50, 100, 10)


@pytest.mark.parametrize("key,value", [
    ("max_queued_per_user", "0"), ("max_queued_per_user", "lots"), ("max_connections", "-1"),
    ("max_connections_per_uid", "1.5"), ("job_tmp_size", "1"), ("job_tmp_size", "big"),
])
def test_bad_limits(tmp_path, key, value):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, f"[lclusterd]\n{key} = {value}\n"))
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_per_uid_connections_within_total(tmp_path):
    with pytest.raises(ConfigError, match="'max_connections_per_uid' .300. is over 'max_connections' .200."):
        config.load(write(tmp_path, "[lclusterd]\nmax_connections = 200\nmax_connections_per_uid = 300\n"))


class Fs:
    def __init__(self, size):
        self.f_blocks, self.f_frsize = size // 4096, 4096


def test_job_tmp_default_is_a_share_of_the_smaller_filesystem():
    sizes = {"/tmp": 2 * 1024 ** 3, "/var/tmp": 100 * 1024 ** 3}  # a 2G tmpfs, a 100G disk
    assert config.default_job_tmp_size(lambda p: Fs(sizes[p])) == 204 * 1024 ** 2  # 10% of 2G, whole MiB
    assert config.default_job_tmp_size(lambda p: Fs(100 * 1024 ** 2)) == 64 * 1024 ** 2  # the floor

    def missing(path):
        raise FileNotFoundError(path)
    assert config.default_job_tmp_size(missing) == 64 * 1024 ** 2


def test_job_tmp_size_from_file_and_empty(tmp_path):
    assert config.load(write(tmp_path, "[lclusterd]\njob_tmp_size = 1G\n")).job_tmp_size == 1024 ** 3
    assert config.load(write(tmp_path, "[lclusterd]\njob_tmp_size =\n")).job_tmp_size \
        == config.default_job_tmp_size()
    assert config.Config().job_tmp_size >= config.MIN_JOB_TMP


# -- etcd: the package's TLS default, never in the way of a plain external etcd --

def packaged(present):
    return lambda path: path in present


def test_local_etcd_over_tls_when_the_package_made_its_certificates():
    c = config.from_mapping({}, exists=packaged(set(config.DEFAULT_TLS.values())))
    assert c.etcd_endpoints == ("https://127.0.0.1:2379",)
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == tuple(config.DEFAULT_TLS.values())


def test_local_etcd_plain_without_the_certificates():
    c = config.from_mapping({}, exists=packaged(set()))
    assert c.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == (None, None, None)


def test_external_plain_etcd_ignores_the_default_certificates():
    for present in (set(), set(config.DEFAULT_TLS.values())):
        c = config.from_mapping({"etcd_endpoints": "http://10.0.0.1:2379"}, exists=packaged(present))
        assert c.etcd_endpoints == ("http://10.0.0.1:2379",)
        assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == (None, None, None)


def test_external_tls_etcd_with_files_of_its_own():
    files = {"etcd_ca": "/srv/ca.pem", "etcd_cert": "/srv/me.pem", "etcd_key": "/srv/me.key"}
    c = config.from_mapping({"etcd_endpoints": "https://10.0.0.1:2379", **files},
                            exists=packaged(set(files.values())))
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == tuple(files.values())


@pytest.mark.parametrize("values,present,message", [
    ({"etcd_endpoints": "https://e:2379"}, set(), "use https:// but there is no CA certificate"),
    ({"etcd_ca": "/srv/ca.pem"}, set(), "'etcd_ca': /srv/ca.pem does not exist"),
    ({"etcd_endpoints": "http://e:2379", "etcd_ca": "/srv/ca.pem"}, {"/srv/ca.pem"}, "need https://"),
    ({"etcd_endpoints": "http://a:2379,https://b:2379"}, set(), "mixes http:// and https://"),
    ({"etcd_endpoints": "10.0.0.1:2379"}, set(), "is not a URL"),
    ({"etcd_endpoints": "https://e:2379", "etcd_ca": "/srv/ca.pem", "etcd_cert": "/srv/c.pem"},
     {"/srv/ca.pem", "/srv/c.pem"}, "go together"),
])
def test_bad_etcd_settings(values, present, message):
    with pytest.raises(ConfigError, match=message) as e:
        config.from_mapping(values, exists=packaged(present))
    assert "\n" not in str(e.value)


# -- the shipped conffile documents every setting, and says reload or restart ----

CONFFILE = os.path.join(os.path.dirname(__file__), "..", "..", "units", "lclusterd.conf")


def conffile_blocks():
    """[(keys, markers)] per paragraph of the shipped conffile."""
    with open(CONFFILE, encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    blocks = []
    for paragraph in paragraphs:
        keys = [line[1:].split("=")[0].strip() for line in paragraph.splitlines()
                if line.startswith("#") and not line.startswith("# ") and "=" in line]
        markers = {m for m in ("[reload]", "[restart]") if m in paragraph}
        if keys:
            blocks.append((keys, markers))
    return blocks


def test_conffile_documents_every_setting_once():
    keys = [key for keys, _ in conffile_blocks() for key in keys]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(config.Config))


def test_conffile_says_which_settings_reload_applies():
    for keys, markers in conffile_blocks():
        assert len(markers) == 1, f"{keys}: say [reload] or [restart]"
        for key in keys:
            assert (key in daemon.RELOADABLE) == (markers == {"[reload]"}), key


def test_conffile_defaults_parse(tmp_path):
    with open(CONFFILE, encoding="utf-8") as f:
        text = f.read()
    uncommented = "\n".join(line[1:] if line.startswith("#") and not line.startswith("# ") else line
                            for line in text.splitlines())
    values = dict(configparser_section(uncommented))
    present = {values["etcd_ca"], values["etcd_cert"], values["etcd_key"]}
    c = config.from_mapping(values, exists=lambda path: path in present)
    assert c.etcd_endpoints == ("https://127.0.0.1:2379",)


def configparser_section(text):
    import configparser
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser[config.SECTION].items()


def test_a_bad_number_says_so_plainly(tmp_path):
    with pytest.raises(ConfigError, match=r"^bad value for 'slots': 'lots' is not a number$"):
        config.load(write(tmp_path, "[lclusterd]\nslots = lots\n"))


# --- issue 11: what a node offers the scheduler ------------------------------------

def test_capacity_defaults(no_default_file):
    c = config.load()
    assert c.cpus == float(os.cpu_count() or 1) and isinstance(c.cpus, float)
    assert c.memory_reserve == 256 << 20
    assert c.memory == config.mem_total() - (256 << 20)
    assert (c.labels, c.placement) == ({}, "spread")


def test_mem_total_reads_meminfo(tmp_path):
    path = write(tmp_path, "MemTotal:       24731184 kB\nMemFree:        22650372 kB\n", "meminfo")
    assert config.mem_total(path) == 24731184 * 1024
    assert config.mem_total(str(tmp_path / "absent")) > 0  # the kernel's page count instead


@pytest.mark.parametrize("values, memory", [
    ({}, (8 << 30) - (256 << 20)),
    ({"memory_reserve": "1G"}, 7 << 30),
    ({"memory_reserve": "0"}, 8 << 30),
    ({"memory": "2G", "memory_reserve": "1G"}, 2 << 30),  # given: the reserve does not apply
    ({"memory": ""}, (8 << 30) - (256 << 20)),
])
def test_memory_is_the_machine_less_the_reserve_unless_given(values, memory):
    assert config.from_mapping(values, total_memory=8 << 30).memory == memory


def test_capacity_and_labels_from_file(tmp_path):
    c = config.load(write(tmp_path, "[lclusterd]\ncpus = 3.5\nmemory = 6G\nlabels = rack=a, ssd=yes\n"
                                    "placement = pack\n"))
    assert (c.cpus, c.memory, c.labels, c.placement) == (3.5, 6 << 30, {"rack": "a", "ssd": "yes"}, "pack")


@pytest.mark.parametrize("key, value, said", [
    ("cpus", "lots", "not a number of CPUs"), ("cpus", "0", "not a number of CPUs"),
    ("memory", "huge", "not a size"), ("memory_reserve", "-1", "not a size"),
    ("labels", "rack", "is not KEY=VALUE"), ("labels", "a=1,a=2", "given twice"),
    ("labels", "node=n9", "node=<name> is implied"),
    ("placement", "random", "must be spread or pack, not 'random'"),
])
def test_bad_scheduling_settings_are_one_line(tmp_path, key, value, said):
    with pytest.raises(ConfigError, match=said) as e:
        config.load(write(tmp_path, f"[lclusterd]\n{key} = {value}\n"))
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_a_reserve_over_the_machine_is_refused():
    with pytest.raises(ConfigError, match="'memory_reserve' \\(8G\\) leaves no memory"):
        config.from_mapping({"memory_reserve": "8G"}, total_memory=8 << 30)
