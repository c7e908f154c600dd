#!/usr/bin/env bash
# A throwaway Slurm cluster on this one machine: N emulated nodes, for the tests and for trying
# launch/slurm/pretrain.sbatch without a real cluster.
#
#   sudo launch/slurm/local_cluster.sh up [N]     # install Slurm + munge if missing, start N nodes (default 2)
#   export SLURM_CONF=/tmp/hp-slurm/slurm.conf    # printed by `up`; or: eval "$(launch/slurm/local_cluster.sh env)"
#   launch/slurm/local_cluster.sh status          # exit 0 when up, 3 when down
#   sudo launch/slurm/local_cluster.sh down       # stop what `up` started, by PID; undo the /etc/hosts line
#
# Needs root (apt, /etc/hosts, daemons running as root). Everything else lives under one folder,
# $HP_SLURM_DIR (default /tmp/hp-slurm), with its own munge key and socket, so a system Slurm or munge
# already on the machine is left alone. Ports: $HP_SLURM_PORT (slurmctld, default 16817) and the N
# ports after it (one slurmd each). `up` is a no-op when the cluster is already up; `down` cancels
# the cluster's jobs, stops its daemons and keeps only $HP_SLURM_DIR/log.
#
# Why it looks like this (Debian 12, Slurm 22.05): several `slurmd -N name` run on one host, one
# port each. Each runs in its own UTS namespace (`unshare --uts`) so `hostname` differs per node, and
# the node names get an /etc/hosts line: torch's rendezvous and `scontrol show hostnames` must be
# able to tell the nodes apart and resolve them. cred_expire=10 keeps requeued jobs quick (a requeued
# job waits cred_expire seconds before it may start again) and sched_interval=2 looks at pending jobs
# every 2 s instead of 60. MinJobAge=16: `sbatch --wait` polls every 2 s, then every 8 s (it quadruples
# its interval while it is below MinJobAge / 2), and a job record purged before its next poll makes it
# return 0 whatever the exit code ("no longer found and exit code not found"); with MinJobAge=2 that
# happened under load.
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, not always on a user's PATH
STATE=${HP_SLURM_DIR:-/tmp/hp-slurm}
PORT=${HP_SLURM_PORT:-16817}
CONF=$STATE/slurm.conf
MARK="# hp-slurm $STATE"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (installs packages, edits /etc/hosts, starts daemons)"; }

install_if_missing() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch srun scontrol munged mungekey; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    (( missing )) || return 0
    log "installing ${PACKAGES[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    # Fails loudly with apt's own message: the tests must fail, not skip, where Slurm cannot be had.
    apt-get update -q || die "apt-get update failed (output above)"
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" || die "apt-get install ${PACKAGES[*]} failed (output above)"
}

# The PID in a pid file, if that process is alive and is the named program (guards against PID reuse).
live_pid() {
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name" || return 1
    echo "$pid"
}

nodes_conf() { [[ -f $STATE/nodes ]] && cat "$STATE/nodes"; }

daemons() {  # "pidfile name" per daemon this cluster runs
    echo "$STATE/run/munged.pid munged"
    echo "$STATE/run/slurmctld.pid slurmctld"
    local node
    for node in $(nodes_conf); do echo "$STATE/run/slurmd-$node.pid slurmd"; done
}

running_count() {
    local n=0 file name
    while read -r file name; do live_pid "$file" "$name" >/dev/null && n=$((n + 1)); done < <(daemons)
    echo "$n"
}

write_config() {
    local n=$1 i cpus
    cpus=$(nproc)
    mkdir -p "$STATE"/{run,log,ctld,spool,munge}
    chmod 755 "$STATE" "$STATE/munge"  # clients of any user reach the socket; the key stays 0600
    [[ -f $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
    chmod 600 "$STATE/munge/munge.key"
    : >"$STATE/nodes"
    for ((i = 1; i <= n; i++)); do echo "hp-node$i" >>"$STATE/nodes"; done
    cat >"$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh: $n emulated nodes on one host.
ClusterName=hp-local
SlurmctldHost=hp-ctld(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=16
KillWait=30
SlurmdTimeout=60
EOF
    for ((i = 1; i <= n; i++)); do
        echo "NodeName=hp-node$i NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

hosts_add() {
    grep -qF "$MARK" /etc/hosts && return 0
    # Appended and rewritten in place, never renamed over: /etc/hosts is often a bind mount in containers.
    [[ -z $(tail -c1 /etc/hosts) ]] || echo >>/etc/hosts
    echo "127.0.0.1 hp-ctld $(nodes_conf | tr '\n' ' ')$MARK" >>/etc/hosts
}

hosts_remove() {
    grep -qF "$MARK" /etc/hosts || return 0
    local kept
    kept=$(grep -vF "$MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for $what; logs in $STATE/log:"
            tail -n 20 "$STATE"/log/* >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

all_idle() {
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ -n $states ]] && ! grep -qv '^idle$' <<<"$states"
}

up() {
    local n=${1:-2}
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of nodes, got '$n'"
    need_root
    install_if_missing
    local running
    running=$(running_count)
    if ((running > 0)); then
        if ((running == n + 2)) && [[ $(nodes_conf | wc -l) == "$n" ]]; then
            log "already up with $n nodes ($STATE); nothing to do"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        die "a cluster in $STATE is partly up or has another node count; run '$0 down' first"
    fi
    rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/run"  # stale state from an unclean stop
    write_config "$n"
    hosts_add

    munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" --force
    wait_for 20 munged test -S "$STATE/munge/munge.socket"

    export SLURM_CONF=$CONF
    # Own hostname per daemon (each daemonizes and stays in its namespace). Where namespaces are not
    # allowed (a container without CAP_SYS_ADMIN) the nodes share the host's name: Slurm and our env://
    # rendezvous still work, tools that tell nodes apart by hostname do not.
    local uts=(unshare --uts) node
    if ! unshare --uts true 2>/dev/null; then
        log "warning: unshare --uts is not permitted here; the emulated nodes keep the host's hostname"
        uts=()
    fi
    # shellcheck disable=SC2016  # $0, $1, $2 belong to the inner sh
    "${uts[@]}" sh -c '{ [ -z "$1" ] || hostname hp-ctld; } && exec slurmctld -c -f "$0"' "$CONF" "${uts[*]}"
    wait_for 30 slurmctld scontrol ping
    for node in $(nodes_conf); do
        # shellcheck disable=SC2016
        "${uts[@]}" sh -c '{ [ -z "$2" ] || hostname "$1"; } && exec slurmd -f "$0" -N "$1"' "$CONF" "$node" "${uts[*]}"
    done
    wait_for 60 "$n idle nodes" all_idle || die "nodes did not come up; see $STATE/log"
    log "up: $n nodes, state in $STATE"
    SLURM_CONF=$CONF sinfo >&2
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # SIGTERM, then SIGKILL after 15 s
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    need_root
    if [[ -f $CONF ]] && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; then
        # Cancel this cluster's jobs first: their slurmstepd processes would outlive slurmd.
        local jobs
        mapfile -t jobs < <(SLURM_CONF=$CONF squeue -h -o %i)
        ((${#jobs[@]} == 0)) || SLURM_CONF=$CONF scancel --full --quiet "${jobs[@]}" || true
        wait_for 60 "jobs to end" test -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" || true
    fi
    local file name pid
    # slurmd first, munged last: the daemons talk to munge while they shut down.
    while read -r file name; do
        pid=$(live_pid "$file" "$name") && { log "stopping $name ($pid)"; stop_pid "$pid"; }
    done < <(daemons | tac)
    hosts_remove
    if [[ -d $STATE ]]; then
        find "$STATE" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
    fi
    log "down; logs kept in $STATE/log"
}

status() {
    local file name pid up=0 total=0
    while read -r file name; do
        total=$((total + 1))
        if pid=$(live_pid "$file" "$name"); then
            up=$((up + 1))
            echo "$name ($(basename "$file" .pid)): running, pid $pid"
        else
            echo "$name ($(basename "$file" .pid)): stopped"
        fi
    done < <(daemons)
    if ((up > 0)) && ((up == total)); then
        SLURM_CONF=$CONF sinfo -N || true
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    ((up == 0)) && echo "down ($STATE)"
    return 3
}

case ${1:-} in
    up) up "${2:-2}" ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up [N] | down | status | env" >&2; exit 2 ;;
esac
