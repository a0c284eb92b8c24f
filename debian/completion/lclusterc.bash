# bash completion for lclusterc(1)                          -*- shell-script -*-
#
# Installed as /usr/share/bash-completion/completions/lclusterc, where
# bash-completion loads it the first time lclusterc is completed. It needs
# nothing from bash-completion itself, so `source` also works without it.
#
# Subcommands and options are listed here (tests/system/test_completion.py
# checks them against lclusterc's own); job uuids and node names are asked of
# the daemon with the same --socket/--server/--token-file as the command line.

# _lclusterc_ask WHAT [GLOBAL-OPTION...]: the caller's live job uuids (WHAT=jobs;
# root: everyone's) or the cluster's node names (WHAT=nodes), one a line.
# Silent and quick when no daemon answers: completion must never hang a shell.
_lclusterc_ask()
{
    local what=$1
    shift
    local -a query
    if [[ $what == jobs ]]; then
        query=(list --json --limit 1000)
        [[ $EUID -ne 0 ]] && query+=(--user "$(id -un)")
    else
        query=(nodes --json)
    fi
    timeout 5 lclusterc "$@" "${query[@]}" 2>/dev/null | python3 -c '
import json, sys
try:
    records = json.load(sys.stdin)
except ValueError:
    records = []
for r in records if isinstance(records, list) else []:
    if not isinstance(r, dict):
        continue
    if sys.argv[1] == "nodes":
        print(r.get("name") or "")
    elif r.get("state") not in ("succeeded", "failed", "cancelled"):  # live
        print(r.get("uuid") or "")
' "$what" 2>/dev/null
}

_lclusterc()
{
    # bash splits words at "=" and ":" (COMP_WORDBREAKS): "--server=http://h:1"
    # arrives as 7 words. Glue them back, to read the command line as lclusterc will.
    local -a words=()
    local cword=0 i j=-1 glue= t
    for ((i = 0; i < ${#COMP_WORDS[@]}; i++)); do
        t=${COMP_WORDS[i]}
        if ((j >= 0)) && [[ $t == [=:] || -n $glue ]]; then
            words[j]+=$t
            [[ $t == [=:] ]] && glue=1 || glue=
        else
            words[++j]=$t
            glue=
        fi
        ((i == COMP_CWORD)) && cword=$j
    done
    local cur=${words[cword]} prev=
    ((cword > 0)) && prev=${words[cword - 1]}
    if [[ $cur == --*=* ]]; then # the value of --opt=value (bash completes the part after "=")
        prev=${cur%%=*}
        cur=${cur#*=}
    fi
    COMPREPLY=()

    local commands="addjob checkjob removejob list logs wait nodes"
    local global_opts="--socket --server --token-file --version --help"
    # Options that take a value (the next word), of any subcommand.
    local valued=" --socket --server --token-file --retries --priority --memory --cpus --tasks
        --timeout --env --workdir --network --user --count --limit --state --node --since
        --until --tail "

    # The words before the cursor: global options (kept for the daemon
    # queries), the subcommand, then its options and arguments.
    local -a global=() args=()
    local cmd= w dashdash=
    i=1
    while ((i < cword)); do
        w=${words[i]}
        if [[ -z $cmd ]]; then
            case $w in
                --socket | --server | --token-file)
                    global+=("$w" "${words[i + 1]}")
                    ((i += 2))
                    continue
                    ;;
                --socket=* | --server=* | --token-file=*) global+=("$w") ;;
                -*) ;;
                *) cmd=$w ;;
            esac
        elif [[ -n $dashdash || $w != -* ]]; then
            args+=("$w")
        elif [[ $w == -- ]]; then
            dashdash=1
        elif [[ $valued == *" $w "* ]]; then
            ((i++)) # its value is not an argument
        fi
        ((i++))
    done

    case $prev in
        --socket | --token-file)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
        --workdir)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -d -- "$cur")
            return
            ;;
        --state)
            mapfile -t COMPREPLY < <(compgen -W "queued starting running succeeded failed
                cancelled warned lost" -- "$cur")
            return
            ;;
        --node)
            mapfile -t COMPREPLY < <(compgen -W "$(_lclusterc_ask nodes "${global[@]}")" -- "$cur")
            return
            ;;
        --user)
            mapfile -t COMPREPLY < <(compgen -u -- "$cur")
            return
            ;;
        --network)
            [[ $cur == *:* ]] && return # ns:NAME: a namespace of the node's, not known here
            mapfile -t COMPREPLY < <(compgen -W "none host ns:" -- "$cur")
            [[ ${COMPREPLY[0]} == ns: ]] && compopt -o nospace 2>/dev/null
            return
            ;;
    esac
    # Any other option with a value: a number, a size, a time, free text.
    [[ -z $dashdash && $valued == *" $prev "* ]] && return

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$global_opts" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur")
        fi
        return
    fi

    local opts
    case $cmd in
        addjob) opts="--wait --retries --priority --json --memory --cpus --tasks --timeout
                      --env --workdir --network --user --count" ;;
        checkjob) opts="--json --unit-properties" ;;
        removejob) opts="--json" ;;
        list) opts="--limit --state --node --user --since --until --json" ;;
        logs) opts="--follow -f --tail --since" ;;
        nodes) opts="--json" ;;
        wait) opts= ;;
        *) return ;; # not a subcommand of ours
    esac
    if [[ -z $dashdash && $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts --help" -- "$cur")
        return
    fi

    # Arguments: a job reference, once (wait: any number, each once).
    case $cmd in
        checkjob | removejob | logs)
            ((${#args[@]} == 0)) || return
            mapfile -t COMPREPLY < <(compgen -W "$(_lclusterc_ask jobs "${global[@]}")" -- "$cur")
            ;;
        wait)
            local uuid
            for uuid in $(_lclusterc_ask jobs "${global[@]}"); do
                [[ $uuid == "$cur"* && " ${args[*]} " != *" $uuid "* ]] && COMPREPLY+=("$uuid")
            done
            ;;
    esac
}

complete -F _lclusterc lclusterc
