#!/bin/bash
# Guest side of the real-kernel tier: runs INSIDE the QEMU guest booted by run-guest.sh, over the
# trixie root of make-rootfs.sh, with the checkout at /work/tlshd (read-only).
#
#   guest.sh OUTDIR SCENARIO...
#
# Scenarios (the same names as tests/kernel/scenarios.py, which holds what each must show):
#   nvme_psk            NVMe/TCP host + target over TLS (PSK), 8 MiB O_DIRECT I/O, disconnect
#   nvme_psk_sha384     the same with a SHA-384 PSK (NVMe0R02) beside the SHA-256 one
#   nvme_no_agent       the same connect with no agent: ESRCH at once
#   nvme_done_status    a raw agent (accept-probe.py) answers DONE(13): the host sees EACCES
#   nvme_done_noadmin   the same, its DONE sent without CAP_NET_ADMIN (does DONE need it?)
#   nvme_startup        the agent started and, as soon as the kernel sees it listen, a connect:
#                       exec -> listener and exec -> first ACCEPT; the connect must succeed
#   nfs_tls             NFSv4.2 mount with xprtsec=tls of an xprtsec=tls export, file I/O
#   nfs_mtls            the same with xprtsec=mtls on both sides
#   nfs_plain_refused   a mount without xprtsec of a TLS-only export: refused (EPERM)
#   nfs_tls_on_mtls     an xprtsec=tls mount of an mtls export: handshakes succeed, mount refused
#   nfs_untrusted_ca    the server's certificate comes from a CA the client does not trust
#   nvme_loop N / nfs_loop N   N connect/disconnect (mount/umount) cycles, for bench/real_kernel
#   nvme_burst N        N NVMe/TCP connects at once (their queues' handshakes together)
#   app_pair            tlshd.app: both ends of a loopback pair secured by the agent, bulk data
#   app_wrap            tlshd wrap: unmodified curl to openssl s_server, python3 -m http.server
#   app_bench MIB N     kTLS against user-space OpenSSL bulk throughput; N set-ups through wrap
# Environment: TLSHD_GUEST_AGENT=tlshd (default) | reference (ktls-utils' /usr/sbin/tlshd);
# TLSHD_GUEST_WORKERS: tlshd's worker count (default: its own, one per CPU).
#
# For each scenario S: OUTDIR/S/trace.txt (tracefs handshake:* events, trace_clock=mono),
# OUTDIR/S/tls_stat.before|after, and "RESULT S.key=value" lines on stdout and in
# OUTDIR/results. Never run it on a host: it loads modules, configures nvmet and nfsd.
set -u

OUT=${1:?usage: guest.sh OUTDIR SCENARIO...}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# Debian's python3 with its python3-openssl, python3-cryptography and python3-pyroute2
# (make-rootfs.sh): the agent as a distribution user runs it. The helpers import the checkout
# from the working directory ($REPO); the agent is started as `tlshd install` writes the unit,
# `python3 -S .../tlshd/early.py`, which puts the checkout after the standard library on
# sys.path (no PYTHONPATH: on this 9p root every directory ahead of the standard library costs
# every import a lookup).
PY=${TLSHD_PYTHON:-/usr/bin/python3}
AGENT=("$PY" -S "$REPO/tlshd/early.py")
AGENT_KIND=${TLSHD_GUEST_AGENT:-tlshd}
# the reference agent: trixie's ktls-utils 1.0.0, or sid's 1.4.0 with its newer GnuTLS and libnl
# (TLSHD_GUEST_REFERENCE=1.4, unpacked by scripts/qemu/ktls-utils-1.4.sh)
if [ "${TLSHD_GUEST_REFERENCE:-}" = 1.4 ]; then
    REFERENCE=(env LD_LIBRARY_PATH=/opt/ktls-utils-1.4/usr/lib/x86_64-linux-gnu
               /opt/ktls-utils-1.4/usr/sbin/tlshd)
else
    REFERENCE=(/usr/sbin/tlshd)
fi
WORK=/tmp/tlshd-guest
# The checkout is read-only here: without a writable cache every start compiles every module
# again, which an installed agent never does (pip and dpkg byte-compile at install time). So the
# checkout is byte-compiled once per boot, before any start is timed, as an install would.
export PYTHONPYCACHEPREFIX=$WORK/pycache
T=/sys/kernel/tracing
mkdir -p "$OUT" "$WORK"
touch "$OUT/results"
"$PY" -m compileall -q "$REPO/tlshd" > /dev/null || echo "GUEST: compileall failed" >&2

say() { echo "GUEST: $*"; }
SCEN=global
result() { echo "RESULT $SCEN.$1=$2" | tee -a "$OUT/results"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
counters() { awk '{printf "%s:%s,", $1, $2}' /proc/net/tls_stat; }

AGENT_PID=
NOTIFY_PID=
cleanup() {
    agent_stop > /dev/null 2>&1
    [ -n "$NOTIFY_PID" ] && kill "$NOTIFY_PID" 2> /dev/null
    dmesg > "$OUT/dmesg.txt" 2>&1
    say "end"
}
trap cleanup EXIT
cd "$REPO" || exit 1

# ---- the kernel side -----------------------------------------------------------------------------
setup_kernel() {
    result kernel "$(uname -r)"
    result ncpus "$(nproc)"
    result agent_kind "$AGENT_KIND"
    [ "$AGENT_KIND" != reference ] || result reference_version "$("${REFERENCE[@]}" --version 2>&1 | head -1)"
    for m in tls nvme-keyring nvme-fabrics nvme-tcp nvmet nvmet-tcp nfsd nfs nfsv4; do
        modprobe "$m"; result "modprobe_$m" $?
    done
    modprobe brd rd_nr=1 rd_size=65536; result modprobe_brd $?
    # the floor under any Python agent's start-up on this machine
    result python_startup_s "$( { time -p "$PY" -c pass; } 2>&1 | awk '/^real/ { print $2 }')"
    result python_nosite_startup_s "$( { time -p "$PY" -I -S -c pass; } 2>&1 | awk '/^real/ { print $2 }')"
    if "$PY" -c "from tlshd.upcall import NetlinkUpcall; NetlinkUpcall(join=False).close()" \
            > "$WORK/genl.err" 2>&1; then
        result genl_handshake ok
        # attribute discovery: what the kernel's policy says each op accepts (nlctrl GETPOLICY)
        result handshake_policy "$("$PY" -c "from tlshd.upcall import NetlinkUpcall as U
u = U(join=False)
print(u.policy.describe({2: 'ACCEPT', 3: 'DONE'}) if u.policy else 'none',
      'tags' if u.session_tags else 'no-tags')
u.close()" 2>&1 | tail -1)"
    else
        result genl_handshake "failed: $(tr '\n' ' ' < "$WORK/genl.err")"
    fi
    [ -d "$T/events" ] || mount -t tracefs nodev "$T" 2> /dev/null
    if [ -d "$T/events/handshake" ]; then
        ls "$T/events/handshake" | paste -sd, - > "$OUT/handshake-events.txt"
        echo mono > "$T/trace_clock"
        echo 8192 > "$T/buffer_size_kb"
        echo 1 > "$T/events/handshake/enable"
        # TLSHD_GUEST_TRACE=sunrpc: also who reads the NFS sockets and when (a stall hunt)
        if [ "${TLSHD_GUEST_TRACE:-}" = sunrpc ]; then
            echo 65536 > "$T/buffer_size_kb"
            for e in xs_data_ready xs_stream_read_data xs_stream_read_request \
                     xprt_lookup_rqst svc_tls_start svc_tls_upcall svc_tls_complete \
                     svc_tls_timed_out svc_tls_unavailable svc_tls_not_started \
                     svcsock_data_ready svcsock_tcp_recv svcsock_tcp_state \
                     rpc_socket_connect rpc_socket_close rpc_socket_state_change \
                     xs_connect rpc_tls_unavailable rpc_tls_not_started; do
                [ -d "$T/events/sunrpc/$e" ] && echo 1 > "$T/events/sunrpc/$e/enable"
            done
        fi
        result tracefs ok
    else
        result tracefs missing
    fi
    mountpoint -q /mnt || mount -t tmpfs tmpfs /mnt
}

scenario_begin() {
    SCEN=$1
    mkdir -p "$OUT/$SCEN"
    say "scenario $SCEN"
    [ -d "$T/events/handshake" ] && echo > "$T/trace"
    cp /proc/net/tls_stat "$OUT/$SCEN/tls_stat.before"
    dmesg > "$WORK/dmesg.before"
}

scenario_end() {
    sleep 0.3
    cp /proc/net/tls_stat "$OUT/$SCEN/tls_stat.after"
    [ -d "$T/events/handshake" ] && cp "$T/trace" "$OUT/$SCEN/trace.txt"
    dmesg > "$WORK/dmesg.after"
    diff "$WORK/dmesg.before" "$WORK/dmesg.after" | sed -n 's/^> //p' > "$OUT/$SCEN/dmesg.txt"
    result done yes
    SCEN=global
}

# ---- credentials and the agent -------------------------------------------------------------------
setup_credentials() {
    "$PY" -c "from pathlib import Path; from tests.pki import write_pki; write_pki(Path('$WORK/pki'))"
    result pki $?
    HOSTID=$(cat /proc/sys/kernel/random/uuid)
    # hostid goes with the hostnqn: 6.12 refuses a hostnqn that differs from the default
    # host's while reusing its hostid ("found same hostid ... but different hostnqn", EINVAL)
    HOSTNQN="nqn.2014-08.org.nvmexpress:uuid:$HOSTID"
    SUBNQN="nqn.2026-01.io.tlshd:qemu-test"
    local hex
    hex=$(awk '$8 == "keyring" && $9 == ".nvme:" { print $1 }' /proc/keys)
    [ -n "$hex" ] || { result nvme_keyring missing; return 1; }
    NVME_KR=$((16#$hex))
    result nvme_keyring "$NVME_KR"
    # the identity kernel 6.12's default host lookup asks for: NVMe0R01 <hostnqn> <subnqn>
    PSK=$(head -c 32 /dev/urandom | keyctl padd psk "NVMe0R01 $HOSTNQN $SUBNQN" "$NVME_KR")
    result psk_serial "${PSK:-none}"
}

# $1: server certificate stem (server | server-untrusted)
write_agent_config() {
    local p=$WORK/pki
    # [debug] as ktls-utils' own tlshd.conf ships it turned up: loglevel=10 (issue 12)
    cat > "$WORK/agent.conf" <<EOF
[debug]
loglevel=10
tls=0
nl=0

[authenticate]
keyrings=.nvme
$( [ "$AGENT_KIND" != reference ] && [ "${TLSHD_GUEST_GROUPS:-}" = classical ] &&
   echo 'groups=?*X25519:?secp256r1:?X448:?secp384r1:?secp521r1' )

[authenticate.client]
x509.truststore=$p/ca.pem
x509.certificate=$p/client.crt
x509.private_key=$p/client.key

[authenticate.server]
x509.truststore=$p/ca.pem
x509.certificate=$p/$1.crt
x509.private_key=$p/$1.key
$( [ "$AGENT_KIND" != reference ] && printf '\n[agent]\ntags_dir=%s\n' "$WORK/tags.d" )
$( [ "$AGENT_KIND" != reference ] && [ "${TLSHD_GUEST_PRIVSEP:-}" = off ] &&
   echo 'privsep=false' )
$( [ "$AGENT_KIND" != reference ] && printf '\n[app]\nenabled=true\nallow_users=root\n' )
EOF
    # session tags (docs/session-tags.md) for this agent: no released kernel takes them in
    # DONE, so the server lines show them and every DONE must still be accepted
    mkdir -p "$WORK/tags.d"
    cat > "$WORK/tags.d/guest.yml" <<'EOF'
filters:
  test-ca: {type: x509.tbs.issuer, pattern: "CN=tlshd test CA,*"}
  any-certificate: {type: x509.tbs.version, pattern: "*"}
tags:
  test-clients: {filter: [test-ca]}
  no-certificate: {filter: ["not any-certificate"]}
EOF
}

# READY=1 and RELOADING=1 from tlshd's sd_notify, one line a message, in $WORK/notify.log
start_notify_listener() {
    rm -f "$WORK/notify.sock" "$WORK/notify.log"
    "$PY" - "$WORK/notify.sock" "$WORK/notify.log" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        log.write(s.recv(4096).decode(errors="replace").replace("\n", " ") + "\n")
EOF
    NOTIFY_PID=$!
    for _ in $(seq 100); do [ -S "$WORK/notify.sock" ] && break; sleep 0.1; done
}

ready_count() {
    local n
    n=$(grep -c 'READY=1' "$WORK/notify.log" 2> /dev/null) || true
    echo "${n:-0}"
}

# wait until notify.log has more than $1 READY=1 lines (at most $2 seconds)
wait_ready_count() {
    local i
    for i in $(seq $(($2 * 10))); do
        [ "$(ready_count)" -gt "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

agent_listening() {  # $1 pid: one of its sockets is generic netlink with a group joined
    # /proc/net/netlink: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode (port ids are not
    # pids: match the socket inodes)
    local inodes
    inodes=$(ls -l "/proc/$1/fd" 2> /dev/null | sed -n 's/.*socket:\[\([0-9]*\)\]$/\1/p' | paste -sd' ' -)
    awk -v list=" $inodes " '$2 == 16 && $4 != "00000000" && index(list, " " $10 " ") { f = 1 }
        END { exit !f }' /proc/net/netlink
}

agent_start() {
    local t0
    t0=$(now)
    if [ "$AGENT_KIND" = reference ]; then
        # ktls-utils' tlshd: the same config keys; it has no readiness notification, so wait
        # until it has joined the tlshd multicast group (a READY is then delivered)
        "${REFERENCE[@]}" -c "$WORK/agent.conf" -s > "$OUT/agent-$SCEN.log" 2>&1 &
        AGENT_PID=$!
        local i
        for i in $(seq 600); do
            agent_listening "$AGENT_PID" && break
            sleep 0.1
        done
        result agent_ready "$(elapsed "$t0" "$(now)")"
        return 0
    fi
    [ -n "$NOTIFY_PID" ] || start_notify_listener
    local before
    before=$(ready_count)
    # default worker count (one per CPU), as deployed; TLSHD_GUEST_WORKERS overrides it
    NOTIFY_SOCKET="$WORK/notify.sock" "${AGENT[@]}" -s -c "$WORK/agent.conf" \
        --upcall netlink ${TLSHD_GUEST_WORKERS:+--workers "$TLSHD_GUEST_WORKERS"} \
        >> "$OUT/agent-$SCEN.log" 2>&1 &
    AGENT_PID=$!
    if wait_ready_count "$before" 120; then
        result agent_ready "$(elapsed "$t0" "$(now)")"
    else
        result agent_ready no
    fi
}

descendants() {  # $1 pid: its children, theirs, ...
    local c
    for c in $(cat "/proc/$1/task/$1/children" 2> /dev/null); do echo "$c"; descendants "$c"; done
}

record_agent_processes() {  # the privilege of each process under the agent, while it serves
    [ "$AGENT_KIND" = reference ] || [ -z "$AGENT_PID" ] && return 0
    local p list=
    for p in $(descendants "$AGENT_PID"); do
        list="$list $(awk '$1 == "Uid:" { u = $2 } $1 == "CapEff:" { c = $2 }
            $1 == "NoNewPrivs:" { n = $2 } $1 == "Seccomp:" { s = $2 }
            END { printf "%s/%s/%s/%s", u, c, n, s }' "/proc/$p/status")"
    done
    result agent_processes "${list# }"
}

agent_reload() {
    if [ "$AGENT_KIND" = reference ]; then agent_stop; agent_start; return; fi
    local before t0
    before=$(ready_count)
    t0=$(now)
    kill -HUP "$AGENT_PID"
    if wait_ready_count "$before" 60; then
        result agent_reload "$(elapsed "$t0" "$(now)")"
    else
        result agent_reload no
    fi
}

agent_stop() {
    [ -n "$AGENT_PID" ] || return 0
    kill -TERM "$AGENT_PID" 2> /dev/null
    wait "$AGENT_PID"
    result agent_exit $?
    AGENT_PID=
}

cost_begin() {  # the agent's CPU and peak summed RSS over a loop (agent-cost.py), for bench/real_kernel
    COST_SAMPLER=
    [ -n "$AGENT_PID" ] || return 0
    "$PY" "$HERE/agent-cost.py" begin "$AGENT_PID" "$WORK/cost-$SCEN.json" || return 0
    "$PY" "$HERE/agent-cost.py" sample "$AGENT_PID" "$WORK/cost-$SCEN.peak" &
    COST_SAMPLER=$!
}

cost_end() {
    [ -n "$COST_SAMPLER" ] || return 0
    kill "$COST_SAMPLER" 2> /dev/null
    wait "$COST_SAMPLER" 2> /dev/null
    local line
    line=$("$PY" "$HERE/agent-cost.py" end "$AGENT_PID" "$WORK/cost-$SCEN.json" \
        "$WORK/cost-$SCEN.peak") || return 0
    result agent_cpu_s "$(echo "$line" | sed -n 's/.*cpu_s=\([0-9.]*\).*/\1/p')"
    result agent_peak_rss_kb "$(echo "$line" | sed -n 's/.*peak_rss_kb=\([0-9]*\).*/\1/p')"
    result agent_exited "$(echo "$line" | sed -n 's/.*exited=\([0-9]*\).*/\1/p')"
}

# ---- NVMe/TCP ------------------------------------------------------------------------------------
NVMET_READY=
setup_nvmet() {
    [ -n "$NVMET_READY" ] && return 0
    local cfg=/sys/kernel/config n
    mountpoint -q "$cfg" || mount -t configfs none "$cfg"
    n=$cfg/nvmet
    (
        set -e
        mkdir "$n/hosts/$HOSTNQN"
        mkdir "$n/subsystems/$SUBNQN"
        echo 0 > "$n/subsystems/$SUBNQN/attr_allow_any_host"
        ln -s "$n/hosts/$HOSTNQN" "$n/subsystems/$SUBNQN/allowed_hosts/"
        mkdir "$n/subsystems/$SUBNQN/namespaces/1"
        echo /dev/ram0 > "$n/subsystems/$SUBNQN/namespaces/1/device_path"
        echo 1 > "$n/subsystems/$SUBNQN/namespaces/1/enable"
        mkdir "$n/ports/1"
        echo tcp > "$n/ports/1/addr_trtype"
        echo ipv4 > "$n/ports/1/addr_adrfam"
        echo 127.0.0.1 > "$n/ports/1/addr_traddr"
        echo 4420 > "$n/ports/1/addr_trsvcid"
        echo tls1.3 > "$n/ports/1/addr_tsas"  # also sets addr_treq to "required"
        ln -s "$n/subsystems/$SUBNQN" "$n/ports/1/subsystems/"
    )
    result nvmet_config $?
    result nvmet_treq "$(cat "$n/ports/1/addr_treq" 2> /dev/null)"
    result nvmet_tsas "$(cat "$n/ports/1/addr_tsas" 2> /dev/null)"
    NVMET_READY=yes
}

# writes the options to /dev/nvme-fabrics; prints the reply; fails with the write's status
nvme_connect() {
    local opts="transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$SUBNQN,hostnqn=$HOSTNQN"
    opts="$opts,hostid=$HOSTID,tls"
    exec 3<> /dev/nvme-fabrics || return 99
    if ! echo "$opts" >&3 2> "$WORK/connect.err"; then exec 3>&-; return 1; fi
    local reply=
    read -r reply <&3
    exec 3>&-
    echo "$reply"
}

# the write's error message ("...: No such process") as an errno name (ESRCH)
connect_errno() {
    sed -n 's/.*: //p' "$WORK/connect.err" | head -1 | "$PY" -c '
import errno, os, sys
text = sys.stdin.read().strip()
names = {os.strerror(n): name for n, name in errno.errorcode.items()}
print(names.get(text, text))'
}

nvme_wait_live() {  # $1: controller name; prints the state it reached
    local state=
    for _ in $(seq 100); do
        state=$(cat "/sys/class/nvme/$1/state" 2> /dev/null)
        [ "$state" = live ] && break
        sleep 0.1
    done
    echo "$state"
}

s_nvme_psk() {
    setup_nvmet
    local t0 reply rc ctrl dev=
    t0=$(now)
    reply=$(nvme_connect); rc=$?
    result connect_seconds "$(elapsed "$t0" "$(now)")"
    result consumer_errno "$([ $rc = 0 ] && echo 0 || connect_errno)"
    record_agent_processes
    ctrl=$(echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/nvme\1/p')
    [ -n "$ctrl" ] || return 0
    result ctrl_state "$(nvme_wait_live "$ctrl")"
    result ctrl_queue_count "$(cat "/sys/class/nvme/$ctrl/queue_count" 2> /dev/null)"
    result ctrl_transport "$(cat "/sys/class/nvme/$ctrl/transport" 2> /dev/null)"
    [ -r "/sys/class/nvme/$ctrl/tls_key" ] && result ctrl_tls_key "$(cat "/sys/class/nvme/$ctrl/tls_key")"
    for _ in $(seq 100); do
        for d in /dev/"$ctrl"n1 /dev/nvme*n1; do [ -b "$d" ] && { dev=$d; break; }; done
        [ -n "$dev" ] && break
        sleep 0.1
    done
    result blockdev "${dev:-none}"
    if [ -n "$dev" ]; then
        head -c $((8 << 20)) /dev/urandom > "$WORK/data.in"
        dd if="$WORK/data.in" of="$dev" bs=1M count=8 oflag=direct status=none
        result dd_write_rc $?
        dd if="$dev" of="$WORK/data.out" bs=1M count=8 iflag=direct status=none
        result dd_read_rc $?
        cmp -s "$WORK/data.in" "$WORK/data.out" && result data_identical yes || result data_identical no
    fi
    result tls_stat_connected "$(counters)"
    t0=$(now)
    echo 1 > "/sys/class/nvme/$ctrl/delete_controller"; result disconnect_rc $?
    result disconnect_seconds "$(elapsed "$t0" "$(now)")"
}

s_nvme_psk_sha384() {  # a retained SHA-384 PSK (NVMe0R02): the 6.12 host prefers it to NVMe0R01
    setup_nvmet
    local k
    k=$(head -c 48 /dev/urandom | keyctl padd psk "NVMe0R02 $HOSTNQN $SUBNQN" "$NVME_KR")
    result psk_sha384_serial "${k:-none}"
    s_nvme_psk
    # out of .nvme again: later scenarios find the SHA-256 PSK
    if [ -n "$k" ]; then
        keyctl unlink "$k" "$NVME_KR" > /dev/null 2> "$WORK/unlink.err"
        result psk_sha384_unlinked "$? $(tr '\n' ' ' < "$WORK/unlink.err")"
    fi
}

s_nvme_no_agent() {
    setup_nvmet
    agent_stop
    local t0 rc
    t0=$(now)
    nvme_connect > /dev/null; rc=$?
    result connect_seconds "$(elapsed "$t0" "$(now)")"
    result consumer_errno "$([ $rc = 0 ] && echo 0 || connect_errno)"
    sleep 0.2
    # "nvme nvmeN: queue 0: failed to start TLS: -3" (host), "failed to start TLS, err=-3" (target)
    dmesg > "$WORK/dmesg.after"
    result dmesg_target "$(diff "$WORK/dmesg.before" "$WORK/dmesg.after" | grep -o 'nvmet_tcp: failed to start TLS, err=-\?[0-9]*' | head -1)"
    result dmesg_host "$(diff "$WORK/dmesg.before" "$WORK/dmesg.after" | grep -o 'queue [0-9]*: failed to start TLS: -\?[0-9]*' | head -1)"
}

# a connect answered by accept-probe.py (DONE with status 13; extra probe arguments after it)
probe_connect() {
    setup_nvmet
    agent_stop
    rm -f "$WORK/probe.ready"
    "$PY" "$HERE/accept-probe.py" "$WORK/probe.ready" 13 15 "$@" > "$OUT/$SCEN/probe.txt" 2>&1 &
    local probe=$! t0 rc
    for _ in $(seq 300); do [ -f "$WORK/probe.ready" ] && break; sleep 0.1; done
    t0=$(now)
    nvme_connect > /dev/null; rc=$?
    result connect_seconds "$(elapsed "$t0" "$(now)")"
    result consumer_errno "$([ $rc = 0 ] && echo 0 || connect_errno)"
    kill "$probe" 2> /dev/null; wait "$probe" 2> /dev/null
    result done_ack "$(probe_says done_ack | head -1)"
}

probe_says() { sed -n "s/^PROBE $1=//p" "$OUT/$SCEN/probe.txt"; }

s_nvme_done_status() {
    probe_connect
    result accept_attrs "$(sed -n -e 's/^PROBE attr=\([A-Z_0-9]*\):.*/\1/p' -e 's/^PROBE end_of_reply/;/p' "$OUT/$SCEN/probe.txt" | head -16 | paste -sd, -)"
}

s_nvme_done_noadmin() {  # DONE sent without CAP_NET_ADMIN in the effective set
    probe_connect drop-admin
    result done_ack_without_admin "$(probe_says done_ack_without_admin | head -1)"
    result cap_net_admin_at_done "$(probe_says cap_net_admin_effective | sort -u | paste -sd, -)"
}

s_app_pair() {  # tlshd.app: the agent secures both ends of a loopback pair, then bulk data
    local line
    (cd "$REPO" && "$PY" scripts/qemu/app-pair.py "$WORK/pki") > "$OUT/$SCEN/app.txt" 2>&1
    while IFS= read -r line; do
        case $line in *=*) result "${line%%=*}" "${line#*=}" ;; esac
    done < "$OUT/$SCEN/app.txt"
}

s_app_bench() {  # $1 MiB, $2 connects: kTLS against user-space OpenSSL; wrap's set-up cost
    local line
    (cd "$REPO" && "$PY" scripts/qemu/app-bench.py "$WORK/pki" "$1" "$2") \
        > "$OUT/$SCEN/bench.txt" 2>&1
    result rc $?
    while IFS= read -r line; do
        case $line in *=*) result "${line%%=*}" "${line#*=}" ;; esac
    done < "$OUT/$SCEN/bench.txt"
}

wait_tcp_port() {  # $1 port on 127.0.0.1: up to 20 s for a listener
    local i
    for i in $(seq 200); do
        ss -Hltn "sport = :$1" 2> /dev/null | grep -q LISTEN && return 0
        sleep 0.1
    done
    return 1
}

s_app_wrap() {  # tlshd wrap: unmodified curl and python3 -m http.server over kTLS
    local www=$WORK/www p=$WORK/pki srv
    local wrap=("$PY" -m tlshd wrap --verbose)
    mkdir -p "$www"
    head -c 1048576 /dev/urandom > "$www/file"
    result file_sha256 "$(sha256sum < "$www/file" | cut -d' ' -f1)"
    # curl speaks plain HTTP to openssl s_server -WWW; the wire carries TLS (the agent's
    # handshake inside curl's connect(), kTLS records after it)
    (cd "$www" && exec openssl s_server -quiet -accept 127.0.0.1:4433 -cert "$p/server.crt" \
        -key "$p/server.key" -WWW) > "$OUT/$SCEN/s_server.txt" 2>&1 &
    srv=$!
    wait_tcp_port 4433
    (cd "$REPO" && "${wrap[@]}" --server-name localhost -- \
        curl -sS -o "$WORK/curl.out" http://127.0.0.1:4433/file) 2> "$OUT/$SCEN/wrap-curl.txt"
    result curl_rc $?
    result curl_sha256 "$(sha256sum < "$WORK/curl.out" | cut -d' ' -f1)"
    kill "$srv"; wait "$srv" 2> /dev/null
    # -WWW sends no Content-Length: curl reads to the end, where s_server's close_notify
    # alert reaches its read() as EIO (kTLS). -HTTP sends the file as the whole response,
    # here with a Content-Length, and curl stops at the body's end.
    { printf 'HTTP/1.0 200 OK\r\nContent-Length: %s\r\n\r\n' "$(stat -c %s "$www/file")"
      cat "$www/file"; } > "$www/page"
    (cd "$www" && exec openssl s_server -quiet -accept 127.0.0.1:4434 -cert "$p/server.crt" \
        -key "$p/server.key" -HTTP) >> "$OUT/$SCEN/s_server.txt" 2>&1 &
    srv=$!
    wait_tcp_port 4434
    (cd "$REPO" && "${wrap[@]}" --server-name localhost -- \
        curl -sS -o "$WORK/page.out" http://127.0.0.1:4434/page) 2>> "$OUT/$SCEN/wrap-curl.txt"
    result curl_length_rc $?
    result curl_length_sha256 "$(sha256sum < "$WORK/page.out" | cut -d' ' -f1)"
    kill "$srv"; wait "$srv" 2> /dev/null
    # python3 -m http.server, unmodified, serves curl https:// with the agent's certificate
    (cd "$REPO" && exec "${wrap[@]}" -- "$PY" -m http.server 8443 --bind 127.0.0.1 \
        --directory "$www") > /dev/null 2> "$OUT/$SCEN/wrap-http.txt" &
    srv=$!
    wait_tcp_port 8443
    curl -sS --cacert "$p/ca.pem" -o "$WORK/https.out" https://localhost:8443/file \
        2> "$OUT/$SCEN/curl-https.txt"
    result https_rc $?
    result https_sha256 "$(sha256sum < "$WORK/https.out" | cut -d' ' -f1)"
    # a TLS 1.2 client fails its handshake and never reaches the server; the next one does
    curl -sS --cacert "$p/ca.pem" --tls-max 1.2 -o /dev/null https://localhost:8443/file \
        2>> "$OUT/$SCEN/curl-https.txt"
    result tls12_rc $?
    curl -sS --cacert "$p/ca.pem" -o /dev/null https://localhost:8443/file \
        2>> "$OUT/$SCEN/curl-https.txt"
    result after_rc $?
    kill "$srv"; wait "$srv" 2> /dev/null
    result wrap_tls_lines "$(cat "$OUT/$SCEN"/wrap-*.txt | grep -c ': TLS, peer')"
}

s_nvme_startup() {  # a connect as soon as the kernel sees a listener, while the agent loads
    setup_nvmet
    agent_stop
    [ -n "$NOTIFY_PID" ] || start_notify_listener
    local before t0 i reply rc ctrl
    before=$(ready_count)
    rm -f "$WORK/agent.pid" "$WORK/listener.mono"
    "$PY" "$HERE/listen-probe.py" "$WORK/agent.pid" "$WORK/listener.mono" &
    local probe=$!
    sleep 2  # the probe is up and polling for the pid file
    # the bare interpreter's start-up now, beside the same probe and after the same scenarios:
    # the floor the agent's exec to listener is compared with (the median of three)
    local floors
    floors=$(for i in 1 2 3; do { time -p "$PY" -I -S -c pass; } 2>&1 | awk '/^real/ { print $2 }'; done)
    result python_nosite_startup_all "$(echo $floors)"
    result python_nosite_startup_s "$(echo "$floors" | sort -n | sed -n 2p)"
    # CLOCK_MONOTONIC in seconds (/proc/uptime, 10 ms steps), the clock of the trace
    t0=$(cut -d' ' -f1 /proc/uptime)
    if [ "$AGENT_KIND" = reference ]; then
        "${REFERENCE[@]}" -c "$WORK/agent.conf" -s >> "$OUT/agent-$SCEN.log" 2>&1 &
    else
        NOTIFY_SOCKET="$WORK/notify.sock" "${AGENT[@]}" -s -c "$WORK/agent.conf" \
            --upcall netlink ${TLSHD_GUEST_WORKERS:+--workers "$TLSHD_GUEST_WORKERS"} \
            >> "$OUT/agent-$SCEN.log" 2>&1 &
    fi
    AGENT_PID=$!
    echo "$AGENT_PID" > "$WORK/agent.pid"
    wait "$probe"
    result exec_mono "$t0"
    result listener_mono "$(cat "$WORK/listener.mono" 2> /dev/null)"
    result ready_then "$([ "$(ready_count)" != "$before" ] && echo yes || echo no)"
    reply=$(nvme_connect); rc=$?
    result consumer_errno "$([ $rc = 0 ] && echo 0 || connect_errno)"
    record_agent_processes
    ctrl=$(echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/nvme\1/p')
    [ -n "$ctrl" ] && { echo 1 > "/sys/class/nvme/$ctrl/delete_controller"; result disconnect_rc $?; }
    if [ "$AGENT_KIND" != reference ]; then wait_ready_count "$before" 120; fi
}

s_nvme_loop() {  # $1 cycles: connect, wait live, disconnect
    setup_nvmet
    local i reply ctrl ok=0 t0
    cost_begin
    t0=$(now)
    for i in $(seq "$1"); do
        reply=$(nvme_connect) || continue
        ctrl=$(echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/nvme\1/p')
        [ "$(nvme_wait_live "$ctrl")" = live ] && ok=$((ok + 1))
        echo 1 > "/sys/class/nvme/$ctrl/delete_controller"
    done
    cost_end
    result cycles_ok "$ok"
    result seconds "$(elapsed "$t0" "$(now)")"
}

s_nvme_burst() {  # $1 connects at once (duplicate_connect): admin and I/O queues' handshakes together
    setup_nvmet
    local i t0 pids= ok=0 ctrl
    local opts="transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$SUBNQN,hostnqn=$HOSTNQN"
    opts="$opts,hostid=$HOSTID,tls,duplicate_connect"
    cost_begin
    t0=$(now)
    for i in $(seq "$1"); do
        # a connect's write returns once its admin and I/O queues are connected
        ( exec 3<> /dev/nvme-fabrics && echo "$opts" >&3 && read -r reply <&3 &&
          echo "$reply" > "$WORK/burst.$i" ) 2> /dev/null &
        pids="$pids $!"
    done
    # shellcheck disable=SC2086
    wait $pids
    result seconds "$(elapsed "$t0" "$(now)")"
    cost_end
    for i in $(seq "$1"); do
        ctrl=$(sed -n 's/.*instance=\([0-9]*\).*/nvme\1/p' "$WORK/burst.$i" 2> /dev/null)
        [ -n "$ctrl" ] || continue
        [ "$(nvme_wait_live "$ctrl")" = live ] && ok=$((ok + 1))
        echo 1 > "/sys/class/nvme/$ctrl/delete_controller"
        rm -f "$WORK/burst.$i"
    done
    result connects_ok "$ok"
}

# ---- NFSv4.2 -------------------------------------------------------------------------------------
NFSD_READY=
setup_nfsd() {
    [ -n "$NFSD_READY" ] && return 0
    # the 9p root cannot be exported: a tmpfs with fsid=0 is the pseudo-root
    mountpoint -q /srv || mount -t tmpfs tmpfs /srv
    mkdir -p /srv/export
    mount -t tmpfs tmpfs /srv/export
    echo "written by the server" > /srv/export/server-file
    mkdir -p /var/lib/nfs/rpc_pipefs /var/lib/nfs/v4recovery
    mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
    rpcbind -w; result rpcbind $?
    export_as tls
    rpc.mountd; result mountd $?
    # the NFSv4 grace period (90 s by default) blocks OPEN/CREATE: shorten it
    rpc.nfsd -G 10 -L 10 4; result nfsd $?
    NFSD_STARTED=$(now)
    NFSD_READY=yes
}

export_as() {  # $1: tls | mtls
    exportfs -ua 2> /dev/null
    exportfs -o "rw,fsid=0,no_root_squash,insecure,xprtsec=$1" 127.0.0.1:/srv/export
    result "exportfs_$1" $?
}

# grace: the first mount after rpc.nfsd waits until the grace period is over
wait_grace() {
    local left
    left=$(awk -v a="$NFSD_STARTED" -v b="$(now)" 'BEGIN { l = 11 - (b - a); print (l > 0) ? int(l + 1) : 0 }')
    [ "$left" -gt 0 ] && sleep "$left"
    return 0
}

nfs_mount() {  # $1 mount options; prints nothing, returns mount.nfs's status
    mkdir -p /mnt/nfs
    timeout 120 mount -t nfs -o "vers=4.2,$1" 127.0.0.1:/ /mnt/nfs > "$WORK/mount.err" 2>&1
}

# mount.nfs's message becomes an errno name the scenarios compare
mount_errno() {
    case "$(cat "$WORK/mount.err")" in
        *"Operation not permitted"*) echo EPERM ;;
        *"access denied"*|*"Permission denied"*) echo EACCES ;;
        *"timed out"*|*"Connection timed out"*) echo ETIMEDOUT ;;
        *) head -c 200 "$WORK/mount.err" | tr '\n' ' ' ;;
    esac
}

nfs_scenario() {  # $1 export xprtsec, $2 mount options
    setup_nfsd
    export_as "$1"
    wait_grace
    local t0 rc
    t0=$(now)
    nfs_mount "$2"; rc=$?
    result mount_seconds "$(elapsed "$t0" "$(now)")"
    result consumer_errno "$([ $rc = 0 ] && echo 0 || mount_errno)"
    record_agent_processes
    [ $rc = 0 ] || return 0
    local data="written by the client $(date +%s%N)"
    echo "$data" > /mnt/nfs/client-file; result client_write $?
    sync
    [ "$(cat /srv/export/client-file 2> /dev/null)" = "$data" ] && result server_sees_client yes || result server_sees_client no
    [ "$(cat /mnt/nfs/server-file 2> /dev/null)" = "written by the server" ] && result client_sees_server yes || result client_sees_server no
    result mount_proto "$(awk '$2 == "/mnt/nfs" { print $4 }' /proc/mounts | tr ',' '\n' | grep -E '^(vers|xprtsec)=' | paste -sd, -)"
    umount /mnt/nfs; result umount_rc $?
}

s_nfs_tls() { nfs_scenario tls xprtsec=tls; }
s_nfs_mtls() { nfs_scenario mtls xprtsec=mtls; }
s_nfs_plain_refused() { nfs_scenario tls sec=sys; }
s_nfs_tls_on_mtls() { nfs_scenario mtls xprtsec=tls; }
s_nfs_untrusted_ca() {
    write_agent_config server-untrusted; agent_reload
    nfs_scenario tls xprtsec=tls
    write_agent_config server; agent_reload
}

s_nfs_loop() {  # $1 cycles of mount + umount (xprtsec=tls)
    setup_nfsd
    export_as tls
    wait_grace
    local i ok=0 t0 t1 took slow=""
    cost_begin
    t0=$(now)
    for i in $(seq "$1"); do
        t1=$(now)
        nfs_mount xprtsec=tls && { ok=$((ok + 1)); umount /mnt/nfs; }
        took=$(elapsed "$t1" "$(now)")
        # a cycle past 3 s is a stall to look at: its number, length, and CLOCK_MONOTONIC at its end
        awk -v t="$took" 'BEGIN { exit !(t > 3) }' && slow="$slow$i:${took}s@end$(cut -d" " -f1 /proc/uptime),"
    done
    cost_end
    result cycles_ok "$ok"
    result slow_cycles "${slow:-none}"
    result seconds "$(elapsed "$t0" "$(now)")"
}

# ---- main ----------------------------------------------------------------------------------------
SCEN=global
setup_kernel
setup_credentials || exit 1
write_agent_config server
agent_start
while [ $# -gt 0 ]; do
    name=$1; shift
    args=()
    case "$name" in *_loop|*_burst) args=("$1"); shift ;; app_bench) args=("$1" "$2"); shift 2 ;; esac
    if ! declare -F "s_$name" > /dev/null; then say "unknown scenario $name"; continue; fi
    scenario_begin "$name"
    [ -n "$AGENT_PID" ] || case "$name" in *no_agent|*done_*|*_startup) ;; *) agent_start ;; esac
    "s_$name" "${args[@]}"
    scenario_end
done
SCEN=global
agent_stop
result done yes
