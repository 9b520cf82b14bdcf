#!/usr/bin/env bash
# docker-compose smoke test, end to end, on a machine with no Docker engine and no registry
# (shared/notes/PLATFORM.md "Docker"). `make docker-smoke` runs it; it is not part of `make test`.
#
#  1. Debian's docker.io, containerd, runc, tini, iptables, docker-compose (v1) and debootstrap:
#     apt-get download + dpkg -x into $SCRATCH/root (nothing is installed on the machine).
#  2. dockerd started by hand (own data-root, exec-root, pidfile, socket), stopped by its pid.
#  3. Base image $BASE_IMAGE (local/debian-py:bookworm): debootstrap + docker import, if missing.
#  4. docker/wheelhouse: pip wheel of '.[cpu]' on the host (pip in a container cannot verify
#     TLS here), pinned to the versions of .venv when there is one; if missing or stale.
#  5. docker build (context streamed as a tar of the files the image needs), compose up with
#     --exit-code-from probe, compose down. Exit status: the probe's.
# `smoke.sh multinode` runs docker-compose.multinode.yml at step 5 instead: a Ray head and two
# worker nodes (learner_node, rollout_node), the demo submitted with `ray job submit`, checked by
# the submitter (job succeeded, report.json placement) and the probe (/status on the head), and
# /status read from the host through the head's published port. Exit 0 only if all three pass.
# Always cleans up (trap): compose down, dockerd stopped, the docker0 link and the iptables
# rules dockerd leaves (legacy tables: DOCKER chains, FORWARD policy) removed, ip_forward
# restored. Images, the wheelhouse and the debs are kept, so a second run only rebuilds what
# changed. Scratch space: $AMMD_DOCKER_SCRATCH (default .cache/docker, git-ignored).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${AMMD_DOCKER_SCRATCH:-$REPO/.cache/docker}
BASE_IMAGE=${BASE_IMAGE:-local/debian-py:bookworm}
IMAGE=${AMMD_IMAGE:-ammd:local}
WHEELHOUSE=$REPO/docker/wheelhouse
MODE=${1:-single}
case "$MODE" in
    single) COMPOSE_FILE=$REPO/docker/docker-compose.yml; PROJECT=${AMMD_COMPOSE_PROJECT:-ammd-smoke} ;;
    multinode) COMPOSE_FILE=$REPO/docker/docker-compose.multinode.yml; PROJECT=${AMMD_COMPOSE_PROJECT:-ammd-smoke-mn} ;;
    *) echo "usage: docker/smoke.sh [single|multinode]" >&2; exit 2 ;;
esac
SMOKE_TIMEOUT_S=${AMMD_SMOKE_TIMEOUT_S:-1800}
ROOT=$SCRATCH/root                      # unpacked debs
BIN=$SCRATCH/bin                        # iptables, docker-init, ... names dockerd looks up
RUN=$SCRATCH/run                        # exec-root, socket, pidfile
SOCK=$RUN/docker.sock
PIDFILE=$RUN/dockerd.pid
DEBS="docker.io containerd runc tini iptables docker-compose debootstrap"

export DOCKER_HOST=unix://$SOCK AMMD_IMAGE=$IMAGE BASE_IMAGE
T0=$(date +%s); LAST=$T0; TIMES=()
log() { echo "[smoke $(($(date +%s) - T0))s] $*"; }
lap() { local now; now=$(date +%s); TIMES+=("$1: $((now - LAST)) s"); LAST=$now; }
docker() { "$ROOT/usr/bin/docker" "$@"; }
compose() {
    PYTHONPATH=$ROOT/usr/lib/python3/dist-packages /usr/bin/python3 "$ROOT/usr/bin/docker-compose" \
        -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
}

IP_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward)
DOCKERD_PID=""
STARTED_DOCKERD=""
FORWARD_POLICY=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "cleanup: compose down, stopping dockerd (pid $DOCKERD_PID)"
        compose down --remove-orphans >/dev/null 2>&1
        stop_dockerd
    fi
    if [ -n "$STARTED_DOCKERD" ]; then     # only what this run's dockerd left behind
        ip link show docker0 >/dev/null 2>&1 && ip link delete docker0
        clean_iptables
        echo "$IP_FORWARD" > /proc/sys/net/ipv4/ip_forward 2>/dev/null
    fi
    lap cleanup
    printf '  %s\n' "${TIMES[@]}"
    log "done, exit status $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ipt() {
    LD_LIBRARY_PATH="$ROOT/usr/lib/x86_64-linux-gnu" XTABLES_LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu/xtables" \
        "$ROOT/usr/sbin/xtables-legacy-multi" iptables "$@"
}

# dockerd leaves its iptables rules and chains (legacy tables) and a FORWARD policy of DROP:
# delete every rule that names a DOCKER chain or docker0, then those chains; restore the policy.
clean_iptables() {
    local t line rule chain
    for t in filter nat; do
        ipt -t "$t" -S 2>/dev/null | grep '^-A ' | grep -e DOCKER -e docker0 | while read -r line; do
            read -ra rule <<< "${line#-A }"
            ipt -t "$t" -D "${rule[@]}" 2>/dev/null
        done
        for chain in $(ipt -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            ipt -t "$t" -F "$chain" 2>/dev/null; ipt -t "$t" -X "$chain" 2>/dev/null
        done
    done
    [ -n "$FORWARD_POLICY" ] && ipt -t filter -P FORWARD "$FORWARD_POLICY" 2>/dev/null
}

stop_dockerd() {
    local ctrd_pid
    ctrd_pid=$(cat "$RUN/exec/containerd/containerd.pid" 2>/dev/null || true)
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
    # dockerd stops the containerd it started; make sure of it (by pid, never by name).
    if [ -n "$ctrd_pid" ] && kill -0 "$ctrd_pid" 2>/dev/null; then
        grep -q "$RUN/exec/containerd" "/proc/$ctrd_pid/cmdline" 2>/dev/null && kill "$ctrd_pid"
    fi
    rm -f "$PIDFILE" "$SOCK"
    DOCKERD_PID=""
}

# --- 1. the debs ------------------------------------------------------------------------------
fetch_debs() {
    if [ -x "$ROOT/usr/sbin/dockerd" ] && [ -f "$ROOT/usr/bin/docker-compose" ] \
        && [ -x "$ROOT/usr/sbin/debootstrap" ]; then return; fi
    log "fetching and unpacking $DEBS (and what they need that this machine lacks)"
    mkdir -p "$SCRATCH/debs" "$ROOT"
    local extra
    extra=$(apt-get -s install --no-install-recommends $DEBS 2>/dev/null | awk '/^Inst /{print $2}')
    (cd "$SCRATCH/debs" && apt-get download $DEBS $extra 2>&1 | grep -v -e '^Get:' -e unsandboxed || true)
    for deb in "$SCRATCH"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
}

link_bin() {
    mkdir -p "$BIN"
    local t
    for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
        ln -sfn "$ROOT/usr/sbin/xtables-legacy-multi" "$BIN/$t"
    done
    ln -sfn "$ROOT/usr/bin/tini-static" "$BIN/docker-init"
}

# --- 2. dockerd -------------------------------------------------------------------------------
start_dockerd() {
    mkdir -p "$RUN" "$SCRATCH/data"
    if [ -f "$PIDFILE" ]; then            # left by a run that could not clean up
        local old; old=$(cat "$PIDFILE")
        if kill -0 "$old" 2>/dev/null && grep -q "$SCRATCH/data" "/proc/$old/cmdline" 2>/dev/null; then
            log "stopping the dockerd a previous run left (pid $old)"
            DOCKERD_PID=$old; stop_dockerd
        fi
        rm -f "$PIDFILE"
    fi
    FORWARD_POLICY=$(ipt -t filter -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}' || true)
    log "starting dockerd (data-root $SCRATCH/data)"
    env PATH="$BIN:$ROOT/usr/sbin:$ROOT/usr/bin:$PATH" \
        LD_LIBRARY_PATH="$ROOT/usr/lib/x86_64-linux-gnu" \
        XTABLES_LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu/xtables" \
        "$ROOT/usr/sbin/dockerd" --data-root "$SCRATCH/data" --exec-root "$RUN/exec" \
        --pidfile "$PIDFILE" -H "unix://$SOCK" --userland-proxy-path "$ROOT/usr/sbin/docker-proxy" \
        >"$SCRATCH/dockerd.log" 2>&1 &
    DOCKERD_PID=$!; STARTED_DOCKERD=1
    for _ in $(seq 120); do
        docker version >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -20 "$SCRATCH/dockerd.log" >&2
    log "dockerd did not come up (log: $SCRATCH/dockerd.log)"
    exit 1
}

# --- 3. the base image ------------------------------------------------------------------------
build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    if [ "$BASE_IMAGE" != "local/debian-py:bookworm" ]; then
        log "base image $BASE_IMAGE is not here; pulling it"; docker pull "$BASE_IMAGE"; return
    fi
    local mirror rootfs=$SCRATCH/rootfs
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    log "building $BASE_IMAGE with debootstrap from $mirror"
    rm -rf "$rootfs"
    DEBOOTSTRAP_DIR=$ROOT/usr/share/debootstrap "$ROOT/usr/sbin/debootstrap" --variant=minbase \
        --include=python3,python3-venv,python3-pip,python3-dev,ca-certificates,g++,libnuma1 \
        bookworm "$rootfs" "$mirror" >"$SCRATCH/debootstrap.log" 2>&1 \
        || { tail -20 "$SCRATCH/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# --- 4. the wheelhouse ------------------------------------------------------------------------
build_wheelhouse() {
    local stamp key py=python3
    [ -x "$REPO/.venv/bin/python" ] && py=$REPO/.venv/bin/python
    key=$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-16)
    stamp=$WHEELHOUSE/.built-from-$key
    if [ -f "$stamp" ]; then return; fi
    log "building the wheelhouse with $py (docker/wheelhouse)"
    rm -rf "$WHEELHOUSE"; mkdir -p "$WHEELHOUSE"
    # Same versions as the tested .venv when there is one; the project itself is not a wheel
    # here (the image installs it from source).
    "$py" -m pip freeze --exclude-editable 2>/dev/null | grep -v -e ' @ ' -e '^-e' -e '^#' \
        > "$SCRATCH/constraints.txt" || true
    "$py" -m pip wheel -q -w "$WHEELHOUSE" -c "$SCRATCH/constraints.txt" "$REPO[cpu]" "setuptools>=68" \
        >"$SCRATCH/wheelhouse.log" 2>&1 \
        || { grep -v 'is ignored' "$SCRATCH/wheelhouse.log" | tail -20 >&2; log "pip wheel failed"; exit 1; }
    rm -f "$WHEELHOUSE"/ammd-*.whl
    touch "$stamp"
}

# --- 5. image, compose up, compose down -------------------------------------------------------
build_image() {
    log "building $IMAGE (base $BASE_IMAGE)"
    local paths=(pyproject.toml cluster rollout services learner tasks configs docker/Dockerfile docker/wheelhouse)
    [ -f "$REPO/README.md" ] && paths+=(README.md)
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -c "${paths[@]}" \
        | docker build -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" - \
            >"$SCRATCH/build.log" 2>&1 \
        || { tail -40 "$SCRATCH/build.log" >&2; log "image build failed (log: $SCRATCH/build.log)"; exit 1; }
    log "$IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
}

# --- 5b. the multi-node compose: detached, then wait for the submitter and the probe ----------
state_of() { docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$1" 2>/dev/null || echo "gone 1"; }
ended() { case "$1" in exited*|dead*|gone*) return 0 ;; esac; return 1; }

host_status() {  # "step N/M" from the job's /status through the head's published port, or nothing
    /usr/bin/python3 -c 'import json, sys, urllib.request as u
s = json.load(u.urlopen(sys.argv[1], timeout=3)); print("step %d/%d, state %s" % (s["step"], s["total_steps"], s["state"]))' \
        "http://127.0.0.1:$AMMD_STATUS_HOST_PORT/status" 2>/dev/null || true
}

run_multinode() {
    export AMMD_STATUS_HOST_PORT=${AMMD_STATUS_HOST_PORT:-$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    log "compose up -d (ray-head, ray-learner, ray-rollout, submitter, probe); /status on 127.0.0.1:$AMMD_STATUS_HOST_PORT"
    compose up -d --no-build
    local sub prb deadline=$(($(date +%s) + SMOKE_TIMEOUT_S)) seen="" now last_log=0 s1 s2
    sub=$(compose ps -q submitter); prb=$(compose ps -q probe)
    while [ "$(date +%s)" -lt "$deadline" ]; do
        s1=$(state_of "$sub"); s2=$(state_of "$prb")
        now=$(host_status)
        if [ -n "$now" ] && { [ -z "$seen" ] || [ $(($(date +%s) - last_log)) -ge 30 ]; }; then
            log "host: /status $now"; seen=1; last_log=$(date +%s)
        fi
        if ended "$s1" && ended "$s2"; then break; fi
        if { ended "$s1" && [ "$s1" != "exited 0" ]; } || { ended "$s2" && [ "$s2" != "exited 0" ]; }; then break; fi
        sleep 5
    done
    compose logs --no-color >"$SCRATCH/multinode.log" 2>&1 || true
    grep -E '^(submitter|probe)' "$SCRATCH/multinode.log" | grep -v -e 'INFO' -e '^\S*\s*|\s*$' | tail -60 || true
    log "submitter: $(state_of "$sub"), probe: $(state_of "$prb") (status, exit code); all logs: $SCRATCH/multinode.log"
    [ -n "$seen" ] || log "the job's /status was never reachable from the host on 127.0.0.1:$AMMD_STATUS_HOST_PORT"
    [ "$(state_of "$sub")" = "exited 0" ] && [ "$(state_of "$prb")" = "exited 0" ] && [ -n "$seen" ]
}

main() {
    command -v apt-get >/dev/null && command -v dpkg >/dev/null \
        || { echo "smoke.sh needs apt-get and dpkg (a Debian-like machine)" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "smoke.sh starts dockerd: run it as root" >&2; exit 2; }
    fetch_debs; link_bin; lap "debs"
    start_dockerd; lap "dockerd start"
    build_base; lap "base image"
    build_wheelhouse; lap "wheelhouse"
    build_image; lap "image build"
    mkdir -p "${AMMD_TOY_DIR:-$REPO/artifacts/toy}"
    compose down --remove-orphans >/dev/null 2>&1 || true
    local rc=0
    if [ "$MODE" = multinode ]; then
        run_multinode || rc=1
    else
        log "compose up (job + probe)"
        timeout "$SMOKE_TIMEOUT_S" env PYTHONPATH="$ROOT/usr/lib/python3/dist-packages" /usr/bin/python3 \
            "$ROOT/usr/bin/docker-compose" -p "$PROJECT" -f "$COMPOSE_FILE" \
            up --no-build --abort-on-container-exit --exit-code-from probe || rc=$?
    fi
    lap "compose up"
    compose down --remove-orphans >/dev/null 2>&1 || true
    lap "compose down"
    if [ "$rc" != 0 ]; then log "SMOKE FAILED ($MODE): exit status $rc"
    elif [ "$MODE" = multinode ]; then
        log "SMOKE OK (multinode): the job ran on 3 Ray nodes, learner ranks and rollout actors on their own"
    else log "SMOKE OK: the probe saw the job's /healthz and a step >= 1 in /status"; fi
    return "$rc"
}

main "$@"
