"""The package's autopkgtest (debian/tests/), run the way autopkgtest runs it on
an isolation-machine testbed: as root on a machine with the .deb installed,
from the source tree, $AUTOPKGTEST_TMP set; it fails on a non-zero exit and,
without allow-stderr, on any output to stderr."""

import re

from tests.system.conftest import REPO

TESTS = REPO / "debian/tests"


def stanzas():
    """The paragraphs of debian/tests/control as {field: value} (deb822, comments dropped)."""
    text = "\n".join(l for l in (TESTS / "control").read_text().splitlines() if not l.startswith("#"))
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        fields, last = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            else:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        out.append(fields)
    return out


def test_control_declares_a_real_test_on_a_whole_machine():
    (stanza,) = stanzas()
    restrictions = set(re.split(r"[\s,]+", stanza["Restrictions"]))
    assert {"needs-root", "isolation-machine"} <= restrictions
    assert "superficial" not in restrictions  # autopkgtest exits 8 when all tests are
    assert "@" in stanza["Depends"]


def test_every_declared_test_passes_in_the_container(box):
    box.sh("mkdir -p /srv/src/debian/tests /srv/autopkgtest-tmp")
    for stanza in stanzas():
        restrictions = set(re.split(r"[\s,]+", stanza.get("Restrictions", "")))
        for name in stanza["Tests"].split():
            script = (TESTS / name).read_text()
            box.sh(f"cat > /srv/src/debian/tests/{name} && chmod +x /srv/src/debian/tests/{name}",
                   input=script)
            r = box.sh(f"cd /srv/src && AUTOPKGTEST_TMP=/srv/autopkgtest-tmp debian/tests/{name}",
                       check=False, timeout=300)
            assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
            if "allow-stderr" not in restrictions:
                assert r.stderr == "", f"{name} wrote to stderr:\n{r.stderr}"
            assert r.stdout.rstrip().endswith(f"{name}: ok"), r.stdout
