#!/bin/bash
# Guest side of the real-kernel tier: runs INSIDE the QEMU guest booted by run-guest.sh.
#
#   guest-nvme.sh OUTDIR
#
# NVMe/TCP with TLS (PSK) over 127.0.0.1 between the kernel's own host (nvme-tcp) and target
# (nvmet-tcp), with tlshd as the handshake agent; then the same connect with no agent.
# Every finding is a line "RESULT key=value" on stdout and in OUTDIR/results; the agent log,
# the handshake trace, dmesg and /proc/net/tls_stat snapshots go to OUTDIR. Never run it on
# a host: it loads modules and configures nvmet.
set -u

OUT=${1:?usage: guest-nvme.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${TLSHD_PYTHON:-$REPO/.venv/bin/python}
WORK=/tmp/tlshd-guest
mkdir -p "$OUT" "$WORK"
: > "$OUT/results"

say() { echo "GUEST: $*"; }
result() { echo "RESULT $1=$2" | tee -a "$OUT/results"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

AGENT_PID=
cleanup() {
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null
    fi
    dmesg > "$OUT/dmesg.txt" 2>&1
    say "end"
}
trap cleanup EXIT

cd "$REPO" || exit 1
result kernel "$(uname -r)"
result ncpus "$(nproc)"
result uptime_at_start "$(cut -d' ' -f1 /proc/uptime)"

# ---- 1. modules, the handshake family, kTLS counters --------------------------------------
for m in tls nvme-keyring nvme-fabrics nvme-tcp nvmet nvmet-tcp brd; do
    if [ "$m" = brd ]; then modprobe brd rd_nr=1 rd_size=65536; else modprobe "$m"; fi
    result "modprobe_$m" $?
done
if "$PY" -c "from tlshd.upcall import NetlinkUpcall; NetlinkUpcall().close()" > "$WORK/genl.err" 2>&1; then
    result genl_handshake ok
else
    result genl_handshake "failed: $(tr '\n' ' ' < "$WORK/genl.err")"
fi
cp /proc/net/tls_stat "$OUT/tls_stat.before" 2>/dev/null
result tls_stat_before "$(awk '{printf "%s:%s,", $1, $2}' /proc/net/tls_stat 2>/dev/null)"

# ---- tracing ---------------------------------------------------------------------------------
T=/sys/kernel/tracing
[ -d "$T/events" ] || mount -t tracefs nodev "$T" 2>/dev/null
if [ -d "$T/events/handshake" ]; then
    ls "$T/events/handshake" > "$OUT/handshake-events.txt"
    echo mono > "$T/trace_clock"
    echo 1 > "$T/events/handshake/enable"
    echo > "$T/trace"
    result tracefs ok
else
    result tracefs missing
fi

# ---- 2. the PSK in .nvme ---------------------------------------------------------------------
# hostid must go with the hostnqn: 6.12 refuses a hostnqn that differs from the default host's
# while reusing its hostid ("found same hostid ... but different hostnqn", EINVAL)
HOSTID=$(cat /proc/sys/kernel/random/uuid)
HOSTNQN="nqn.2014-08.org.nvmexpress:uuid:$HOSTID"
SUBNQN="nqn.2026-01.io.tlshd:qemu-test"
KR_HEX=$(awk '$8 == "keyring" && $9 == ".nvme:" { print $1 }' /proc/keys)
if [ -z "$KR_HEX" ]; then result nvme_keyring missing; exit 1; fi
KR=$((16#$KR_HEX))
result nvme_keyring "$KR"
if keyctl describe %:.nvme > /dev/null 2>&1; then result keyctl_by_name yes; else result keyctl_by_name no; fi
PSK=$(head -c 32 /dev/urandom | keyctl padd psk "NVMe0R01 $HOSTNQN $SUBNQN" "$KR")
result psk_serial "${PSK:-none}"
keyctl show "$KR" > "$OUT/nvme-keyring.txt" 2>&1

# ---- 3. nvmet over configfs ------------------------------------------------------------------
CFG=/sys/kernel/config
mountpoint -q "$CFG" || mount -t configfs none "$CFG"
N=$CFG/nvmet
(
    set -e
    mkdir "$N/hosts/$HOSTNQN"
    mkdir "$N/subsystems/$SUBNQN"
    echo 0 > "$N/subsystems/$SUBNQN/attr_allow_any_host"
    ln -s "$N/hosts/$HOSTNQN" "$N/subsystems/$SUBNQN/allowed_hosts/"
    mkdir "$N/subsystems/$SUBNQN/namespaces/1"
    echo /dev/ram0 > "$N/subsystems/$SUBNQN/namespaces/1/device_path"
    echo 1 > "$N/subsystems/$SUBNQN/namespaces/1/enable"
    mkdir "$N/ports/1"
    echo tcp > "$N/ports/1/addr_trtype"
    echo ipv4 > "$N/ports/1/addr_adrfam"
    echo 127.0.0.1 > "$N/ports/1/addr_traddr"
    echo 4420 > "$N/ports/1/addr_trsvcid"
    echo tls1.3 > "$N/ports/1/addr_tsas"
    ln -s "$N/subsystems/$SUBNQN" "$N/ports/1/subsystems/"
)
result nvmet_config $?
result nvmet_treq "$(cat "$N/ports/1/addr_treq" 2>/dev/null)"
result nvmet_tsas "$(cat "$N/ports/1/addr_tsas" 2>/dev/null)"

# connect: writes the options to /dev/nvme-fabrics; prints the reply, returns the write status
connect() {
    local opts="transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$SUBNQN,hostnqn=$HOSTNQN,hostid=$HOSTID,tls"
    exec 3<>/dev/nvme-fabrics || return 99
    if ! echo "$opts" >&3 2> "$WORK/connect.err"; then exec 3>&-; return 1; fi
    local reply=
    read -r reply <&3
    exec 3>&-
    echo "$reply"
}

# ---- 4. the agent ----------------------------------------------------------------------------
cat > "$WORK/tlshd.conf" <<'EOF'
[authenticate]
keyrings=.nvme
EOF
NOTIFY="$WORK/notify.sock"
rm -f "$NOTIFY" "$WORK/ready"
"$PY" - "$NOTIFY" "$WORK/ready" <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(60)
try:
    while True:
        msg = s.recv(4096).decode(errors="replace")
        if "READY=1" in msg.split("\n"):
            open(sys.argv[2], "w").write(msg)
            break
except OSError:
    pass
EOF
LISTENER=$!
for _ in $(seq 50); do [ -S "$NOTIFY" ] && break; sleep 0.1; done
t0=$(now)
NOTIFY_SOCKET="$NOTIFY" "$PY" -m tlshd -s -c "$WORK/tlshd.conf" --upcall netlink --workers 1 \
    > "$OUT/agent.log" 2>&1 &
AGENT_PID=$!
wait "$LISTENER"
if [ -f "$WORK/ready" ]; then
    result agent_ready "$(elapsed "$t0" "$(now)")"
else
    result agent_ready no
    say "agent log:"; cat "$OUT/agent.log"
fi

# ---- 5. connect with TLS, I/O, disconnect ---------------------------------------------------
t0=$(now)
REPLY=$(connect); rc=$?
t1=$(now)
result connect_rc "$rc"
result connect_reply "$REPLY"
result connect_seconds "$(elapsed "$t0" "$t1")"
[ "$rc" = 0 ] || { result connect_error "$(cat "$WORK/connect.err")"; say "agent log:"; cat "$OUT/agent.log"; }
CTRL=$(echo "$REPLY" | sed -n 's/.*instance=\([0-9]*\).*/nvme\1/p')
if [ -n "$CTRL" ]; then
    state=
    for _ in $(seq 100); do
        state=$(cat "/sys/class/nvme/$CTRL/state" 2>/dev/null)
        [ "$state" = live ] && break; sleep 0.1
    done
    result ctrl_state "$state"
    result ctrl_queue_count "$(cat "/sys/class/nvme/$CTRL/queue_count" 2>/dev/null)"
    result ctrl_transport "$(cat "/sys/class/nvme/$CTRL/transport" 2>/dev/null)"
    [ -r "/sys/class/nvme/$CTRL/tls_key" ] && result ctrl_tls_key "$(cat "/sys/class/nvme/$CTRL/tls_key")"
    DEV=
    for _ in $(seq 100); do
        for d in /dev/nvme*n1; do [ -b "$d" ] && DEV=$d; done
        [ -n "$DEV" ] && break; sleep 0.1
    done
    result blockdev "${DEV:-none}"
    if [ -n "$DEV" ]; then
        head -c $((8 << 20)) /dev/urandom > "$WORK/data.in"
        t0=$(now)
        dd if="$WORK/data.in" of="$DEV" bs=1M count=8 oflag=direct status=none; result dd_write_rc $?
        dd if="$DEV" of="$WORK/data.out" bs=1M count=8 iflag=direct status=none; result dd_read_rc $?
        result io_seconds "$(elapsed "$t0" "$(now)")"
        if cmp -s "$WORK/data.in" "$WORK/data.out"; then result data_identical yes; else result data_identical no; fi
        result data_sha256 "$(sha256sum < "$WORK/data.in" | cut -c1-16)"
    fi
    cp /proc/net/tls_stat "$OUT/tls_stat.connected"
    result tls_stat_connected "$(awk '{printf "%s:%s,", $1, $2}' /proc/net/tls_stat)"
    t0=$(now)
    echo 1 > "/sys/class/nvme/$CTRL/delete_controller"; result disconnect_rc $?
    result disconnect_seconds "$(elapsed "$t0" "$(now)")"
fi
sleep 0.5
cp /proc/net/tls_stat "$OUT/tls_stat.after"
result tls_stat_after "$(awk '{printf "%s:%s,", $1, $2}' /proc/net/tls_stat)"
if [ -d "$T/events/handshake" ]; then
    cp "$T/trace" "$OUT/trace.txt"
    result trace_submit "$(grep -c 'handshake_submit:' "$OUT/trace.txt")"
    result trace_submit_err "$(grep -c 'handshake_submit_err:' "$OUT/trace.txt")"
    result trace_accept "$(grep -c 'handshake_cmd_accept:' "$OUT/trace.txt")"
    result trace_done "$(grep -c 'handshake_cmd_done:' "$OUT/trace.txt")"
    result trace_complete "$(grep -c 'handshake_complete:' "$OUT/trace.txt")"
    result trace_complete_statuses "$(grep 'handshake_complete:' "$OUT/trace.txt" | sed -n 's/.*status=\([-0-9]*\).*/\1/p' | sort | uniq -c | awk '{printf "%s:%s,", $2, $1}')"
fi

# ---- 6. no agent -----------------------------------------------------------------------------
kill -TERM "$AGENT_PID"; wait "$AGENT_PID"; result agent_exit $?
AGENT_PID=
[ -d "$T/events/handshake" ] && echo > "$T/trace"
dmesg > "$WORK/dmesg.before"
t0=$(now)
REPLY=$(connect); rc=$?
result noagent_connect_rc "$rc"
result noagent_connect_seconds "$(elapsed "$t0" "$(now)")"
result noagent_connect_error "$(cat "$WORK/connect.err" 2>/dev/null)"
sleep 0.2
dmesg > "$WORK/dmesg.after"
diff "$WORK/dmesg.before" "$WORK/dmesg.after" | sed -n 's/^> //p' > "$OUT/dmesg-noagent.txt"
# the host logs "nvme nvmeN: queue 0: failed to start TLS: -3", the target "failed to start TLS, err=-3"
result noagent_dmesg "$(grep -o 'nvmet_tcp: failed to start TLS, err=-\?[0-9]*' "$OUT/dmesg-noagent.txt" | head -1)"
result noagent_dmesg_host "$(grep -o 'queue [0-9]*: failed to start TLS: -\?[0-9]*' "$OUT/dmesg-noagent.txt" | head -1)"
[ -d "$T/events/handshake" ] && cp "$T/trace" "$OUT/trace-noagent.txt"

# ---- 7. a hand-made agent: the raw ACCEPT reply, and DONE with a failure status ---------------
[ -d "$T/events/handshake" ] && echo > "$T/trace"
rm -f "$WORK/probe.ready"
"$PY" "$HERE/accept-probe.py" "$WORK/probe.ready" 13 15 > "$OUT/probe.txt" 2>&1 &
PROBE=$!
for _ in $(seq 300); do [ -f "$WORK/probe.ready" ] && break; sleep 0.1; done
dmesg > "$WORK/dmesg.before"
t0=$(now)
REPLY=$(connect); rc=$?
result probe_connect_rc "$rc"
result probe_connect_seconds "$(elapsed "$t0" "$(now)")"
result probe_connect_error "$(cat "$WORK/connect.err" 2>/dev/null)"
kill "$PROBE" 2>/dev/null; wait "$PROBE" 2>/dev/null
dmesg > "$WORK/dmesg.after"
diff "$WORK/dmesg.before" "$WORK/dmesg.after" | sed -n 's/^> //p' > "$OUT/dmesg-probe.txt"
result probe_accept_attrs "$(sed -n -e "s/^PROBE attr=\([A-Z_0-9]*\):.*/\1/p" -e "s/^PROBE end_of_reply/;/p" "$OUT/probe.txt" | head -12 | paste -sd, -)"
result probe_done_ack "$(sed -n 's/^PROBE done_ack=//p' "$OUT/probe.txt" | head -1)"
result probe_dmesg "$(grep -i 'tls\|handshake' "$OUT/dmesg-probe.txt" | head -3 | paste -sd'|' -)"
if [ -d "$T/events/handshake" ]; then
    cp "$T/trace" "$OUT/trace-probe.txt"
    result probe_complete_status "$(sed -n 's/.*handshake_complete:.*status=\([-0-9]*\).*/\1/p' "$OUT/trace-probe.txt" | paste -sd, -)"
fi
result done yes
