"""The daemon's settings: defaults, /etc/lclusterd/lclusterd.conf, then flags."""

import configparser
import dataclasses
import os
import socket
from typing import Optional

from lclusterd import core

DEFAULT_PATH = "/etc/lclusterd/lclusterd.conf"
SECTION = "lclusterd"


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class Config:
    etcd_endpoints: tuple = ("http://127.0.0.1:2379",)
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
    retention: float = 7 * 86400.0  # seconds a finished job's record is kept ("7d" in the file)
    max_finished_jobs: int = 10000  # and at most this many finished records, the latest


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


def from_mapping(values: dict) -> Config:
    config = Config()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown setting '{key}'")
        try:
            setattr(config, key, _parse(key, raw))
        except ValueError as e:
            raise ConfigError(f"bad value for '{key}': {e}")
    if config.slots < 1:
        raise ConfigError("'slots' must be at least 1")
    if not config.prefix.startswith("/") or config.prefix.endswith("/"):
        raise ConfigError("'prefix' must start with / and not end with /")
    for name, _, show in core.LIMITS:
        default, ceiling = getattr(config, f"default_{name}"), getattr(config, f"max_{name}")
        if default is not None and ceiling is not None and default > ceiling:
            raise ConfigError(f"'default_{name}' ({show(default)}) is over 'max_{name}' ({show(ceiling)})")
    if bool(config.etcd_cert) != bool(config.etcd_key):
        raise ConfigError("'etcd_cert' and 'etcd_key' go together")
    if config.address is None and config.listen:
        host, port = config.listen
        config.address = f"http://{config.node_name if host in ('', '0.0.0.0', '::') else host}:{port}"
    return config


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
        return endpoints
    if key == "slots":
        return int(raw) if raw else (os.cpu_count() or 1)
    if key == "retention":
        return core.parse_duration(raw)  # InvalidInput is a ValueError
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
    if key in ("rootfs", "namespace", "address", "etcd_ca", "etcd_cert", "etcd_key"):
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
    return raw
