"""The built package itself: what lintian says of it, and what it holds."""

import subprocess


def deb(deb_dir):
    return str(next(deb_dir.glob("lclusterd_*_all.deb")))


def test_lintian_reports_no_errors(deb_dir):
    r = subprocess.run(["lintian", "--fail-on", "error", deb(deb_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\nE: " not in "\n" + r.stdout


def test_package_holds_commands_units_and_conffile(deb_dir):
    files = subprocess.run(["dpkg-deb", "-c", deb(deb_dir)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("./usr/bin/lclusterd", "./usr/bin/lclusterc",
                 "./lib/systemd/system/lclusterd.socket", "./lib/systemd/system/lclusterd.service",
                 "./lib/systemd/system/lcluster.slice", "./etc/lclusterd/lclusterd.conf"):
        assert path in files, path
    control = subprocess.run(["dpkg-deb", "-I", deb(deb_dir), "conffiles"], capture_output=True,
                             text=True, check=True).stdout
    assert "/etc/lclusterd/lclusterd.conf" in control
