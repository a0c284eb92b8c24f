"""Debian conventions of the source and the built package that lintian does not
check: `debian/rules clean` undoes the build (Policy 4.9), the README and the
API reference are on the machine."""

import subprocess

from tests.system.conftest import REPO


def test_rules_clean_removes_the_egg_info(tmp_path):
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    subprocess.run(f"tar --null -T - --ignore-failed-read -cf - | tar -xf - -C {tmp_path}",
                   shell=True, cwd=REPO, input=files, check=True, capture_output=True)
    subprocess.run(["/usr/bin/python3", "setup.py", "-q", "egg_info"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "lclusterd.egg-info").is_dir()  # what the build leaves
    r = subprocess.run(["debian/rules", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(tmp_path.glob("*.egg-info")), "debian/rules clean left the egg-info"


def test_readme_and_api_reference_are_in_usr_share_doc(deb_dir):
    (deb,) = sorted(deb_dir.glob("lclusterd_*_all.deb"))[-1:]
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    paths = {line.split()[-1] for line in listing.splitlines()}
    for doc in ("README.md", "api.md"):
        assert {f"./usr/share/doc/lclusterd/{doc}", f"./usr/share/doc/lclusterd/{doc}.gz"} & paths, doc
