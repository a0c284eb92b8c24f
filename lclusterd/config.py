"""The daemon's settings: defaults, /etc/lclusterd/lclusterd.conf, then flags."""

import configparser
import dataclasses
import os
import socket
from typing import Optional

from lclusterd import core

DEFAULT_PATH = "/etc/lclusterd/lclusterd.conf"
SECTION = "lclusterd"
# The package's local etcd takes client certificates only; these are the
# files the package makes for the daemon (root-only; units/etcd.service.d/).
ETCD_DIR = "/etc/lclusterd/etcd"
DEFAULT_TLS = {"etcd_ca": f"{ETCD_DIR}/ca.pem", "etcd_cert": f"{ETCD_DIR}/client.pem",
               "etcd_key": f"{ETCD_DIR}/client.key"}
LOCAL_ETCD_TLS = "https://127.0.0.1:2379"
LOCAL_ETCD_PLAIN = "http://127.0.0.1:2379"  # when the package's certificates are not there
JOB_TMP_SHARE = 0.10  # of the smaller of the filesystems holding /tmp and /var/tmp ...
MIN_JOB_TMP = 64 * 1024 ** 2  # ... but at least this much
MEMINFO = "/proc/meminfo"
DEFAULT_MEMORY_RESERVE = 256 * 1024 ** 2  # left to the OS and the daemon itself
PLACEMENTS = ("spread", "pack")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class Config:
    # Unset in the file: the local etcd, https with the package's
    # certificates when they are there, else http (see _resolve_etcd).
    etcd_endpoints: tuple = (LOCAL_ETCD_PLAIN,)
    prefix: str = "/lcluster"  # every key we write starts with this
    node_name: str = dataclasses.field(default_factory=socket.gethostname)
    socket: str = "/run/lclusterd/lclusterd.sock"
    slots: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    stop_timeout: float = 10.0  # seconds from SIGTERM to SIGKILL on removejob
    poll_interval: float = 2.0  # seconds between sweeps that catch what events missed
    rootfs: Optional[str] = None
    namespace: Optional[str] = None
    # What a job gets when it asks for nothing, and the most it may ask for
    # (core.LIMITS); None: no limit.
    default_memory: Optional[int] = None
    max_memory: Optional[int] = None
    default_cpus: Optional[float] = None
    max_cpus: Optional[float] = None
    default_tasks: Optional[int] = None
    max_tasks: Optional[int] = None
    default_timeout: Optional[float] = None
    max_timeout: Optional[float] = None
    # What addjob --network may ask for beyond 'none': host, ns:NAME, ns:*.
    job_networks: tuple = ()
    # The cluster.
    lease_ttl: int = 10  # seconds a node's registration lives without a heartbeat
    listen: Optional[str] = None  # HOST:PORT for TCP (remote lclusterc, other nodes); off if unset
    token_file: str = "/etc/lclusterd/token"  # the shared token TCP callers must send (root-only file)
    address: Optional[str] = None  # URL other nodes reach us at (default from listen)
    etcd_ca: Optional[str] = None  # TLS to etcd: CA certificate file ...
    etcd_cert: Optional[str] = None  # ... and our client certificate and key files
    etcd_key: Optional[str] = None
    tls_cert: Optional[str] = None  # HTTPS on the TCP listener: this node's certificate (PEM) ...
    tls_key: Optional[str] = None  # ... and its key
    tls_client_ca: Optional[str] = None  # callers (and the other nodes) must show a certificate it signed
    tls_ca: Optional[str] = None  # the other nodes' HTTPS is verified against it (default tls_client_ca)
    retention: float = 7 * 86400.0  # seconds a finished job's record is kept ("7d" in the file)
    max_finished_jobs: int = 10000  # and at most this many finished records, the latest
    # What one user or one flood may take.
    max_queued_per_user: int = 10000  # queued jobs per uid (the cluster's, counted in etcd)
    job_tmp_size: int = dataclasses.field(default_factory=lambda: default_job_tmp_size())
    max_connections: int = 4096  # open API connections in total ...
    max_connections_per_uid: int = 256  # ... and per caller uid (unix socket) or TCP peer
    # What this node offers the scheduler (its registration, contract K3):
    # jobs reserve their --cpus and --memory of it.
    cpus: float = dataclasses.field(default_factory=lambda: float(os.cpu_count() or 1))
    memory_reserve: int = DEFAULT_MEMORY_RESERVE
    memory: int = dataclasses.field(default_factory=lambda: mem_total() - DEFAULT_MEMORY_RESERVE)
    labels: dict = dataclasses.field(default_factory=dict)  # node=<name> is implied (core.node_labels)
    placement: str = "spread"  # how the primed node places: spread (least loaded first) or pack


def mem_total(path=MEMINFO) -> int:
    """The machine's RAM in bytes (MemTotal), or the kernel's page count when
    /proc is not readable."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_job_tmp_size(statvfs=os.statvfs):
    """Bytes for each job's private /tmp and /var/tmp: a share of the smaller
    filesystem that holds them, so that a few jobs cannot fill the node's."""
    sizes = []
    for path in ("/tmp", "/var/tmp"):
        try:
            st = statvfs(path)
        except OSError:
            continue
        sizes.append(st.f_blocks * st.f_frsize)
    size = int(min(sizes) * JOB_TMP_SHARE) if sizes else 0
    return max(MIN_JOB_TMP, size // (1024 ** 2) * 1024 ** 2)  # whole MiB


def load(path: Optional[str] = None, **overrides) -> Config:
    """Read the config file (missing is fine for the default path) and apply
    the command line's overrides (None means 'not given')."""
    parser = configparser.ConfigParser()
    file = path or DEFAULT_PATH
    try:
        with open(file, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        if path:
            raise ConfigError(f"config file {path} does not exist")
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"cannot read config file {file}: {e}".splitlines()[0])
    values = dict(parser[SECTION]) if parser.has_section(SECTION) else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(values)


def from_mapping(values: dict, exists=os.path.isfile, total_memory=None) -> Config:
    """A Config from {setting: text or value}; exists(path) tells which of
    the package's etcd certificate files are there; total_memory: the
    machine's RAM in bytes (default: MemTotal)."""
    config = Config()
    config.memory = None  # worked out below, from memory_reserve unless given
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown setting '{key}'")
        try:
            setattr(config, key, _parse(key, raw))
        except ValueError as e:
            said = str(e)
            if said.startswith(("invalid literal", "could not convert")):  # int() / float()
                said = f"'{str(raw).strip()[:40]}' is not a number"
            raise ConfigError(f"bad value for '{key}': {said}")
    if config.slots < 1:
        raise ConfigError("'slots' must be at least 1")
    if config.memory is None:  # unset or empty: what the machine has less the reserve
        total = mem_total() if total_memory is None else total_memory
        if total - config.memory_reserve < core.MIN_MEMORY:
            raise ConfigError(f"'memory_reserve' ({core.show_size(config.memory_reserve)}) leaves no "
                              f"memory of this machine's {core.show_size(total)} for jobs")
        config.memory = total - config.memory_reserve
    if "node" in config.labels:
        raise ConfigError("'labels': node=<name> is implied (the node's name), do not set it")
    if not config.prefix.startswith("/") or config.prefix.endswith("/"):
        raise ConfigError("'prefix' must start with / and not end with /")
    for name, _, show in core.LIMITS:
        default, ceiling = getattr(config, f"default_{name}"), getattr(config, f"max_{name}")
        if default is not None and ceiling is not None and default > ceiling:
            raise ConfigError(f"'default_{name}' ({show(default)}) is over 'max_{name}' ({show(ceiling)})")
    if config.max_connections_per_uid > config.max_connections:
        raise ConfigError(f"'max_connections_per_uid' ({config.max_connections_per_uid}) is over "
                          f"'max_connections' ({config.max_connections})")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("'tls_cert' and 'tls_key' go together: set both or neither")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("'tls_client_ca' needs 'tls_cert' and 'tls_key' (HTTPS)")
    _resolve_etcd(config, given=set(values), exists=exists)
    if config.address is None and config.listen:
        host, port = config.listen
        scheme = "https" if config.tls_cert else "http"
        config.address = f"{scheme}://{config.node_name if host in ('', '0.0.0.0', '::') else host}:{port}"
    return config


def _resolve_etcd(config, given, exists):
    """The endpoints and the TLS files the daemon uses. A certificate setting
    left unset takes the package's file only for https endpoints and only when
    the file is there, so a node set up for an external plain etcd never needs
    them; one set explicitly must exist."""
    for key in DEFAULT_TLS:
        path = getattr(config, key)
        if key in given and path and not exists(path):
            raise ConfigError(f"'{key}': {path} does not exist")
    if "etcd_endpoints" not in given or not config.etcd_endpoints:
        explicit = any(getattr(config, key) for key in DEFAULT_TLS)
        packaged = all(exists(path) for path in DEFAULT_TLS.values())
        config.etcd_endpoints = (LOCAL_ETCD_TLS if explicit or packaged else LOCAL_ETCD_PLAIN,)
    schemes = {e.split("://", 1)[0] for e in config.etcd_endpoints}
    if len(schemes) > 1:
        raise ConfigError("'etcd_endpoints' mixes http:// and https://: use one for all")
    secure = schemes == {"https"}
    for key, path in DEFAULT_TLS.items():
        if key not in given and secure and exists(path):
            setattr(config, key, path)
    if not secure and any(getattr(config, key) for key in DEFAULT_TLS):
        raise ConfigError("'etcd_ca', 'etcd_cert' and 'etcd_key' need https:// etcd_endpoints")
    if secure and not config.etcd_ca:
        raise ConfigError(f"'etcd_endpoints' use https:// but there is no CA certificate: "
                          f"set 'etcd_ca' ({DEFAULT_TLS['etcd_ca']} does not exist)")
    if bool(config.etcd_cert) != bool(config.etcd_key):
        raise ConfigError("'etcd_cert' and 'etcd_key' go together")


_LIMIT_PARSERS = {f"{kind}_{name}": parse for name, parse, _ in core.LIMITS
                  for kind in ("default", "max")}


def _parse(key, raw):
    if not isinstance(raw, str):
        return raw
    raw = raw.strip()
    if key == "etcd_endpoints":
        endpoints = tuple(e.strip() for e in raw.split(",") if e.strip())
        if not endpoints:
            raise ValueError("no endpoint given")
        for endpoint in endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError(f"'{endpoint}' is not a URL (e.g. https://10.0.0.1:2379)")
        return endpoints
    if key == "slots":
        return int(raw) if raw else (os.cpu_count() or 1)
    if key == "retention":
        return core.parse_duration(raw)  # InvalidInput is a ValueError
    if key == "job_tmp_size":
        return core.parse_size(raw) if raw else default_job_tmp_size()
    if key in ("max_queued_per_user", "max_connections", "max_connections_per_uid"):
        value = int(raw)
        if not 1 <= value <= 10 ** 7:
            raise ValueError("must be from 1 to 10000000")
        return value
    if key == "max_finished_jobs":
        value = int(raw)
        if value < 0:
            raise ValueError("must be 0 or more")
        return value
    if key in ("stop_timeout", "poll_interval"):
        value = float(raw)
        if value <= 0:
            raise ValueError("must be positive")
        return value
    if key in ("rootfs", "namespace", "address", "etcd_ca", "etcd_cert", "etcd_key",
               "tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
        return raw or None
    if key in _LIMIT_PARSERS:
        return _LIMIT_PARSERS[key](raw) if raw else None
    if key == "job_networks":
        networks = tuple(n.strip() for n in raw.split(",") if n.strip())
        for network in networks:
            if network != "ns:*":
                core.validate_network(network)
        return networks
    if key == "lease_ttl":
        value = int(raw)
        if not 2 <= value <= 3600:
            raise ValueError("must be from 2 to 3600 seconds")
        return value
    if key == "listen":
        if not raw:
            return None
        host, sep, port = raw.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT (e.g. 0.0.0.0:7800)")
        return host.strip("[]"), int(port)
    if key == "node_name":
        return raw or socket.gethostname()
    if key == "cpus":
        return core.parse_cpus(raw) if raw else float(os.cpu_count() or 1)
    if key == "memory":
        return core.parse_size(raw) if raw else None  # None: MemTotal less memory_reserve
    if key == "memory_reserve":
        if not raw:
            return DEFAULT_MEMORY_RESERVE
        return 0 if raw == "0" else core.parse_size(raw)  # 0: jobs may have it all
    if key == "labels":
        return core.parse_labels(raw)
    if key == "placement":
        if raw not in PLACEMENTS:
            raise ValueError(f"must be spread or pack, not '{raw[:40]}'")
        return raw
    return raw
