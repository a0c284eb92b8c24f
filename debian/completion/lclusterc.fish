# fish completion for lclusterc(1). Installed as
# /usr/share/fish/vendor_completions.d/lclusterc.fish. Job uuids and node
# names are asked of the daemon with the same --socket/--server/--token-file/
# --ca/--cert/--key as the command line.

# The caller's live job uuids and their arrays' ids (root: everyone's), or the
# cluster's node names.
function __lclusterc_ask --argument-names what
    set -l global
    set -l words (commandline -opc)
    set -e words[1]
    while set -q words[1]
        switch $words[1]
            case --socket --server --token-file --ca --cert --key
                set -a global $words[1] $words[2]
                set -e words[1]
            case '--socket=*' '--server=*' '--token-file=*' '--ca=*' '--cert=*' '--key=*'
                set -a global $words[1]
            case '-*'
            case '*'
                break
        end
        set -e words[1]
    end
    set -l query nodes --json
    if test "$what" = jobs
        set query list --json --limit 1000
        test (id -u) -ne 0; and set -a query --user (id -un)
    end
    timeout 5 lclusterc $global $query 2>/dev/null | python3 -c '
import json, sys
try:
    records = json.load(sys.stdin)
except ValueError:
    records = []
seen = set()
for r in records if isinstance(records, list) else []:
    if not isinstance(r, dict):
        continue
    if sys.argv[1] == "nodes":
        found = [r.get("name")]
    elif r.get("state") not in ("succeeded", "failed", "cancelled"):  # live
        found = [r.get("uuid"), r.get("array")]  # a member names its array too
    else:
        continue
    for name in found:
        if isinstance(name, str) and name and name not in seen:
            seen.add(name)
            print(name)
' $what 2>/dev/null
end

set -l commands addjob checkjob removejob list logs wait nodes drain resume
complete -c lclusterc -f

# Global options, before the subcommand.
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l socket -r -F -d "The daemon's unix socket"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l server -x -d "Talk to the daemon at this URL over TCP"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l token-file -r -F -d "The cluster's token, for --server"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l ca -r -F -d "For https:// --server: the CA of the node's certificate"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l cert -r -F -d "For https:// --server: a client certificate"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l key -r -F -d "For https:// --server: the client certificate's key"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -l version -d "Show the version"
complete -c lclusterc -s h -l help -d "Show help"

# Subcommands.
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a addjob -d "Queue a shell command"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a checkjob -d "Show a job's state, exit status, node and times"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a removejob -d "Stop a job or take it off the queue"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a list -d "List jobs"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a logs -d "Show a job's output"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a wait -d "Wait for jobs to end"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a nodes -d "List the cluster's nodes"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a drain -d "Place no new jobs on a node (root)"
complete -c lclusterc -n "not __fish_seen_subcommand_from $commands" -a resume -d "Let a drained node take jobs again (root)"

# addjob
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l wait -d "Wait for the job to end; exit with its status"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l retries -x -d "Attempts in all"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l priority -x -d "Priority, -100 to 100"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob checkjob removejob list nodes" -l json -d "Print JSON records"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l memory -x -d "Memory limit, e.g. 256M"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l cpus -x -d "CPU time limit in CPUs"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l tasks -x -d "Most processes and threads at once"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l timeout -x -d "Stop it after this long, e.g. 10m"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l env -x -d "Set a variable KEY=VAL"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l workdir -x -a "(__fish_complete_directories)" -d "Working directory"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l network -x -a "none host ns:" -d "Network"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob list" -l user -x -a "(__fish_complete_users)" -d "User"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l count -x -d "An array of N copies"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l file -r -F -d "An array of one job per line of FILE (- for stdin)"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l max-running -x -d "With --count or --file: at most K members at once"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l after -x -a "(__lclusterc_ask jobs)" -d "Run once these jobs succeeded"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l after-any -x -a "(__lclusterc_ask jobs)" -d "Run once these jobs ended"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l after-failed -x -a "(__lclusterc_ask jobs)" -d "Run once these jobs failed"
complete -c lclusterc -n "__fish_seen_subcommand_from addjob" -l constraint -x -d "Only on nodes with this label KEY=VALUE"

# checkjob, removejob, logs, wait: a live job of the caller's.
complete -c lclusterc -n "__fish_seen_subcommand_from checkjob" -l unit-properties -d "Show the unit's sandbox properties"
complete -c lclusterc -n "__fish_seen_subcommand_from checkjob removejob logs wait" -a "(__lclusterc_ask jobs)" -d "Live job"

# list
complete -c lclusterc -n "__fish_seen_subcommand_from list" -l limit -x -d "At most this many jobs"
complete -c lclusterc -n "__fish_seen_subcommand_from list" -l state -x -a "queued starting running succeeded failed cancelled warned lost" -d "Only jobs in this state"
complete -c lclusterc -n "__fish_seen_subcommand_from list" -l node -x -a "(__lclusterc_ask nodes)" -d "Only jobs of this node"
complete -c lclusterc -n "__fish_seen_subcommand_from list logs" -l since -x -d "Since WHEN"
complete -c lclusterc -n "__fish_seen_subcommand_from list" -l until -x -d "Until WHEN"

# logs
complete -c lclusterc -n "__fish_seen_subcommand_from logs" -s f -l follow -d "Follow the output while the job runs"
complete -c lclusterc -n "__fish_seen_subcommand_from logs" -l tail -x -d "Only the last N lines"

# nodes, drain, resume: a node's name.
complete -c lclusterc -n "__fish_seen_subcommand_from nodes" -l forget -x -a "(__lclusterc_ask nodes)" -d "Drop a failed node from the table (root)"
complete -c lclusterc -n "__fish_seen_subcommand_from drain" -l reason -x -d "Why, as nodes shows it"
complete -c lclusterc -n "__fish_seen_subcommand_from drain resume" -a "(__lclusterc_ask nodes)" -d "Node"
