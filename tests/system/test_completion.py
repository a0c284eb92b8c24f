"""Shell completion for lclusterc (debian/completion/): the bash, zsh and fish
files name every subcommand and option lclusterc has, and once the .deb is
installed each shell finds its file in its standard directory and completes
the caller's live job uuids and the node names from the daemon.

The host-side tests drive the bash function with a stand-in lclusterc (what
the words mean); the container tests drive it, zsh and fish against the real
daemon as a user would meet them."""

import json
import os
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest

from lclusterd.cli import lclusterc as CLI
from tests.system.conftest import REPO

COMPLETION = REPO / "debian/completion"
BASH_FILE = COMPLETION / "lclusterc"  # named as installed: dh_install does not rename
INSTALLED = {  # each shell's standard directory on Debian
    "bash": "/usr/share/bash-completion/completions/lclusterc",
    "zsh": "/usr/share/zsh/vendor-completions/_lclusterc",
    "fish": "/usr/share/fish/vendor_completions.d/lclusterc.fish",
}


def click_options(command):
    """Every option spelling of a click command, --help included."""
    return {o for p in command.params if p.param_type_name == "option"
            for o in p.opts + p.secondary_opts} | {"--help"}


def bash_complete(words, source, prelude="", run=None):
    """COMPREPLY of _lclusterc for the command line `words` (the last one is
    where the cursor is), as bash computes it after sourcing `source`."""
    script = textwrap.dedent(f"""\
        {prelude}
        . {shlex.quote(str(source))}
        COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        COMP_LINE={shlex.quote(' '.join(words))}
        COMP_POINT=${{#COMP_LINE}}
        COMPREPLY=()
        "$(complete -p lclusterc | sed 's/.* -F \\([^ ]*\\) .*/\\1/')"
        printf '%s\\n' "${{COMPREPLY[@]}}"
        """)
    if run is None:
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return sorted(filter(None, r.stdout.splitlines()))
    return sorted(filter(None, run(script).splitlines()))


# --- host: the files against lclusterc's own command tree ------------------------------

FAKE_JOBS = [
    {"uuid": "aaaa1111-0000-4000-8000-000000000001", "state": "running"},
    {"uuid": "aaaa2222-0000-4000-8000-000000000002", "state": "queued"},
    {"uuid": "aaaa3333-0000-4000-8000-000000000003", "state": "succeeded"},
    {"uuid": "aaaa4444-0000-4000-8000-000000000004", "state": "failed"},
]
LIVE = sorted(j["uuid"] for j in FAKE_JOBS[:2])


@pytest.fixture
def fake_lclusterc(tmp_path, monkeypatch):
    """A stand-in for lclusterc on PATH that answers list/nodes --json and
    records its arguments (the real daemon is in the container tests)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "lclusterc"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> {calls}
        case " $* " in
        *" nodes "*) echo '[{{"name": "n1"}}, {{"name": "n2"}}]' ;;
        *" list "*) echo {shlex.quote(json.dumps(FAKE_JOBS))} ;;
        esac
        """))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return calls


def test_bash_offers_every_subcommand_and_global_option():
    assert bash_complete(["lclusterc", ""], BASH_FILE) == sorted(
        n for n, c in CLI.commands.items() if not c.hidden)
    assert bash_complete(["lclusterc", "-"], BASH_FILE) == sorted(click_options(CLI))


@pytest.mark.parametrize("name", sorted(CLI.commands))
def test_bash_offers_every_option_of_each_subcommand(name):
    assert bash_complete(["lclusterc", name, "-"], BASH_FILE) == sorted(
        click_options(CLI.commands[name]))


@pytest.mark.parametrize("path", ["_lclusterc", "lclusterc.fish"])
def test_zsh_and_fish_files_name_every_subcommand_and_option(path):
    text = (COMPLETION / path).read_text()
    for name, command in CLI.commands.items():
        assert name in text
        for option in click_options(command) | click_options(CLI):
            if path.endswith(".fish"):  # complete -l NAME / -s X
                option = ("-l " if option.startswith("--") else "-s ") + option.lstrip("-")
            assert option in text, f"{path} lacks {option} ({name})"


def test_bash_completes_live_jobs_once_and_after_option_values(fake_lclusterc):
    assert bash_complete(["lclusterc", "checkjob", ""], BASH_FILE) == LIVE
    assert bash_complete(["lclusterc", "removejob", "aaaa1"], BASH_FILE) == LIVE[:1]
    assert bash_complete(["lclusterc", "logs", "--tail", "5", "-f", ""], BASH_FILE) == LIVE
    assert bash_complete(["lclusterc", "checkjob", LIVE[0], ""], BASH_FILE) == []
    assert bash_complete(["lclusterc", "wait", LIVE[0], ""], BASH_FILE) == LIVE[1:]
    assert bash_complete(["lclusterc", "logs", "--tail", ""], BASH_FILE) == []  # a number
    assert bash_complete(["lclusterc", "list", "--node", ""], BASH_FILE) == ["n1", "n2"]
    assert bash_complete(["lclusterc", "list", "--state", "r"], BASH_FILE) == ["running"]
    assert bash_complete(["lclusterc", "list", "--state", "=", "f"], BASH_FILE) == ["failed"]
    assert bash_complete(["lclusterc", "logs", "--tail=5", ""], BASH_FILE) == LIVE


def test_bash_completes_arrays_parents_files_and_nodes_for_issue_11(fake_lclusterc, tmp_path,
                                                                     monkeypatch):
    array = "bbbb0000-0000-4000-8000-00000000000a"
    members = [{"uuid": f"bbbb111{i}-0000-4000-8000-00000000000{i}", "state": "queued",
                "array": array} for i in (1, 2)]
    fake = tmp_path / "lclusterc"
    fake.write_text(fake.read_text().replace(shlex.quote(json.dumps(FAKE_JOBS)),
                                             shlex.quote(json.dumps(FAKE_JOBS + members))))
    offered = sorted(LIVE + [m["uuid"] for m in members] + [array])  # the array's id once
    assert bash_complete(["lclusterc", "wait", ""], BASH_FILE) == offered
    assert bash_complete(["lclusterc", "removejob", "bbbb0"], BASH_FILE) == [array]
    assert bash_complete(["lclusterc", "addjob", "--after", "aaaa1"], BASH_FILE) == LIVE[:1]
    assert bash_complete(["lclusterc", "addjob", "--after-any", f"{LIVE[0]},aaaa2"], BASH_FILE) == [
        f"{LIVE[0]},{LIVE[1]}"]  # the next parent of a comma-separated list
    assert bash_complete(["lclusterc", "addjob", "--max-running", ""], BASH_FILE) == []  # a number
    assert bash_complete(["lclusterc", "drain", ""], BASH_FILE) == ["n1", "n2"]
    assert bash_complete(["lclusterc", "drain", "n1", ""], BASH_FILE) == []  # one node
    assert bash_complete(["lclusterc", "drain", "--reason", ""], BASH_FILE) == []  # free text
    assert bash_complete(["lclusterc", "resume", "n"], BASH_FILE) == ["n1", "n2"]
    assert bash_complete(["lclusterc", "nodes", "--forget", ""], BASH_FILE) == ["n1", "n2"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "commands.txt").write_text("true\n")
    assert bash_complete(["lclusterc", "addjob", "--file", "comm"], BASH_FILE) == ["commands.txt"]
    assert "-" in bash_complete(["lclusterc", "addjob", "--file", ""], BASH_FILE)


def test_bash_asks_the_daemon_named_on_the_command_line(fake_lclusterc):
    bash_complete(["lclusterc", "--socket", "/s1", "checkjob", ""], BASH_FILE)
    # --server=http://h:1 as bash splits it (at "=" and ":")
    bash_complete(["lclusterc", "--server", "=", "http", ":", "//h", ":", "1", "list", "--node", ""],
                  BASH_FILE)
    bash_complete(["lclusterc", "--socket", "=", "/s3", "removejob", ""], BASH_FILE)
    bash_complete(["lclusterc", "--server", "https://h:1", "--ca", "/c.pem", "logs", "-f", ""],
                  BASH_FILE)
    calls = fake_lclusterc.read_text().splitlines()
    uid_filter = [] if os.geteuid() == 0 else ["--user", subprocess.getoutput("id -un")]
    assert [c.split() for c in calls] == [
        ["--socket", "/s1", "list", "--json", "--limit", "1000", *uid_filter],
        ["--server=http://h:1", "nodes", "--json"],
        ["--socket=/s3", "list", "--json", "--limit", "1000", *uid_filter],
        ["--server", "https://h:1", "--ca", "/c.pem", "list", "--json", "--limit", "1000",
         *uid_filter],
    ]


def test_bash_stays_quiet_without_a_daemon(tmp_path, monkeypatch):
    broken = tmp_path / "lclusterc"
    broken.write_text("#!/bin/sh\necho 'lclusterc: cannot reach the daemon' >&2\nexit 69\n")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    r = subprocess.run(["bash", "-c", f". {BASH_FILE}; COMP_WORDS=(lclusterc checkjob '');"
                        " COMP_CWORD=2; _lclusterc; echo \"n=${#COMPREPLY[@]}\""],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "n=0\n", "")


# --- container: the installed files, the real daemon -------------------------------------

@pytest.fixture(scope="module")
def jobs(box):
    """alice's running job, her finished one, and bob's running one."""
    running = box.lc("addjob 'sleep 600'", user="alice").stdout.strip()
    done = box.lc("addjob --wait true", user="alice").stdout.strip()
    bobs = box.lc("addjob 'sleep 600'", user="bob").stdout.strip()
    for uuid in (running, bobs):
        box.wait_state(uuid, ("running",))
    yield {"running": running, "done": done, "bobs": bobs}
    for uuid in (running, bobs):
        box.lc(f"removejob {uuid}", check=False)


def test_installed_in_each_shells_standard_directory(box):
    for shell, path in INSTALLED.items():
        box.sh(f"test -s {path}")
    box.sh(f"bash -n {INSTALLED['bash']} && zsh -n {INSTALLED['zsh']}"
           f" && fish --no-execute {INSTALLED['fish']}")
    # compinit finds _lclusterc on Debian's $fpath and binds it to lclusterc.
    r = box.sh("zsh -fc 'autoload -U compinit && compinit -u -D && print $_comps[lclusterc]'",
               user="alice")
    assert r.stdout.strip() == "_lclusterc", r.stdout + r.stderr


def test_bash_completes_the_callers_live_jobs_from_the_daemon(box, jobs):
    def complete(words, user):
        # As an interactive bash meets it: bash-completion's loader finds the file by name.
        prelude = (". /usr/share/bash-completion/bash_completion; "
                   "_completion_loader lclusterc >/dev/null 2>&1")
        return bash_complete(words, "/dev/null", prelude,
                             run=lambda s: box.sh(f"bash -c {shlex.quote(s)}", user=user).stdout)
    assert complete(["lclusterc", "removejob", ""], "alice") == [jobs["running"]]
    assert complete(["lclusterc", "checkjob", ""], "bob") == [jobs["bobs"]]
    assert complete(["lclusterc", "logs", ""], None) == sorted([jobs["running"], jobs["bobs"]])
    assert complete(["lclusterc", "wait", jobs["running"], ""], "alice") == []
    node = json.loads(box.lc("nodes --json").stdout)[0]["name"]
    assert complete(["lclusterc", "list", "--node", ""], "alice") == [node]
    assert complete(["lclusterc", "ad"], "alice") == ["addjob"]
    assert complete(["lclusterc", "drain", ""], None) == [node]
    assert complete(["lclusterc", "addjob", "--after", ""], "alice") == [jobs["running"]]


# zsh's candidates for a command line (zsh-capture-completion's trick): an
# interactive zsh in a pseudo-terminal, compinit as a user's .zshrc runs it,
# compadd wrapped to write what it adds to $HITS; Tab, then wait for them.
ZSH_CAPTURE = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z 'PROMPT=""; autoload -U compinit; compinit -u -D'
zpty -w z 'compadd() { local -a h; builtin compadd -O h "$@"; (( $#h )) && print -l -- $h >> $HITS; builtin compadd "$@"; }'
zpty -wn z "$1"$'\t'
for i in {1..100}; do [[ -s $HITS ]] && break; sleep 0.1; done
sleep 0.5
zpty -d z
"""


def test_zsh_completes_the_callers_live_jobs_from_the_daemon(box, jobs):
    box.sh("cat > /tmp/zsh-capture && chmod 644 /tmp/zsh-capture", input=ZSH_CAPTURE)

    def complete(line, user="alice"):
        out = box.sh(f"export HITS=$(mktemp) && zsh -f /tmp/zsh-capture {shlex.quote(line)}"
                     " && cat $HITS && rm $HITS", user=user, timeout=60).stdout
        return sorted(set(out.split()))
    assert complete("lclusterc removejob ") == [jobs["running"]]
    assert complete("lclusterc list --state=f") == ["failed"]
    assert complete("lclusterc list --node ") == [json.loads(box.lc("nodes --json").stdout)[0]["name"]]
    assert complete("lclusterc che") == ["checkjob"]
    node = json.loads(box.lc("nodes --json").stdout)[0]["name"]
    assert complete("lclusterc drain ") == [node]
    assert complete("lclusterc nodes --forget=") == [node]
    assert jobs["running"] in complete("lclusterc addjob --after-any=")


def test_fish_completes_the_callers_live_jobs_from_the_daemon(box, jobs):
    def complete(line, user="alice"):
        out = box.sh(f"fish -c {shlex.quote(f'complete -C {shlex.quote(line)}')}", user=user).stdout
        return sorted(line.split("\t")[0] for line in out.splitlines() if line)
    assert complete("lclusterc removejob ") == [jobs["running"]]
    assert complete("lclusterc list --node ") == [json.loads(box.lc("nodes --json").stdout)[0]["name"]]
    assert "checkjob" in complete("lclusterc ")
    assert "--unit-properties" in complete("lclusterc checkjob --")
    node = json.loads(box.lc("nodes --json").stdout)[0]["name"]
    assert complete("lclusterc resume ") == [node]
    assert {"--after", "--after-any", "--after-failed", "--constraint", "--file",
            "--max-running"} <= set(complete("lclusterc addjob --"))
    assert jobs["running"] in complete("lclusterc addjob --after ")
