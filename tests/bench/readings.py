"""What the bench reads from the kernel and from tools, as pure parsers and
one reader: a cgroup's CPU time, `python3 -X importtime`'s cumulative time.
Stdlib only: inner.py imports it inside the container (as a script beside
it), the unit tests as tests.bench.readings."""

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def parse_cpu_stat(text):
    """CPU seconds in a cgroup v2 cpu.stat (its usage_usec line)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise ValueError("no usage_usec in cpu.stat")


def parse_cpuacct_usage(text):
    """CPU seconds in a cgroup v1 cpuacct.usage (nanoseconds)."""
    return int(text.strip()) / 1e9


def cgroup_files(path, root=CGROUP_ROOT):
    """Where the CPU time of the cgroup at path ("system.slice/etcd.service",
    "" for the root we see) may be, in the order looked at: cgroup v2
    (unified), the v2 tree of a hybrid host, then v1's cpuacct (only there
    when systemd keeps CPU accounting in it). On this project's hybrid hosts
    the container's systemd puts every unit in the v2 tree, whose cpu.stat
    counts CPU time without the cpu controller."""
    return [(os.path.join(root, path, "cpu.stat"), parse_cpu_stat),
            (os.path.join(root, "unified", path, "cpu.stat"), parse_cpu_stat),
            (os.path.join(root, "cpuacct", path, "cpuacct.usage"), parse_cpuacct_usage),
            (os.path.join(root, "cpu,cpuacct", path, "cpuacct.usage"), parse_cpuacct_usage)]


def cgroup_cpu(path, root=CGROUP_ROOT):
    """CPU seconds the cgroup at path has used, or None if none of its files
    is there (a stopped unit's cgroup is removed)."""
    for name, parse in cgroup_files(path, root):
        try:
            with open(name) as f:
                return parse(f.read())
        except FileNotFoundError:
            continue
    return None


def parse_importtime(text, module):
    """Cumulative seconds of `import module` in `python3 -X importtime`'s
    output (lines "import time: self [us] | cumulative | imported package")."""
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = [f.strip() for f in line[len("import time:"):].split("|")]
        if len(fields) == 3 and fields[2].strip() == module and fields[1].isdigit():
            return int(fields[1]) / 1e6
    raise ValueError(f"no import of {module} in the importtime output")
