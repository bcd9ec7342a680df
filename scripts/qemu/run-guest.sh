#!/bin/bash
# Host side of the real-kernel tier: boot one of Debian's kernels under QEMU (TCG) with virtme-ng
# over a Debian trixie root (make-rootfs.sh) and run scripts/qemu/guest.sh's scenarios inside it.
# TLSHD_QEMU_KERNEL picks the kernel: 6.12 (default; the newest linux-image-6.12 of trixie) or
# 7.3 (the newest linux-image of trixie-backports, whose image and modules come split as
# linux-binary-REL and linux-modules-REL), downloaded by explicit package name and version,
# never installed.
#
#   scripts/qemu/run-guest.sh OUTDIR SCENARIO...      (see guest.sh for the scenario names)
#
# Needs root and, on the first run, the package registries. Cached under $TLSHD_QEMU_CACHE
# (default /var/cache/tlshd-qemu, shared by every checkout and clean clone of this machine):
# the kernels' .debs and their extracted trees, the trixie root (the kernels' modules, nfs-utils,
# nvme-cli, ktls-utils, and Debian's own python3-openssl, python3-cryptography and
# python3-pyroute2, which the agent runs on), a venv with virtme-ng. Nothing from trixie or
# from backports is installed on the host. Host packages from the host's own suite:
# qemu-system-x86, busybox-static (virtme-ng's initramfs), debootstrap, kmod (virtme-ng's depmod).
#
# The checkout is shared read-only at /work/tlshd, OUTDIR read-write at /out. OUTDIR receives
# console.log (the kernel console and the guest's output), results (RESULT lines) and the
# guest's artefacts. Exit status: 0 when the guest script ran to its end, else non-zero. A boot
# whose guest script does not run to its end is retried from scratch ($TLSHD_QEMU_TRIES,
# default 2; each try at most $TLSHD_QEMU_TIMEOUT, default 300 s).
# TLSHD_GUEST_AGENT=reference runs ktls-utils' tlshd instead of this checkout's: trixie's 1.0.0,
# or with TLSHD_GUEST_REFERENCE=1.4 sid's 1.4.0 (scripts/qemu/ktls-utils-1.4.sh).
# TLSHD_GUEST_TRACE=sunrpc also traces the sunrpc socket events (guest.sh).
# TLSHD_GUEST_GROUPS=classical gives this checkout's agent classical groups only (one X25519 key
# share) instead of its default, the post-quantum hybrid (bench/real_kernel.py --groups);
# TLSHD_GUEST_PRIVSEP=off runs it without privilege separation (--privsep off).
# TLSHD_QEMU_ACCEL=auto (default) boots with KVM when a short probe boot under KVM works, else
# with TCG (on this project's machines /dev/kvm exists but nested KVM fails at once:
# "kvm_buf_set_msrs: Assertion ... failed", "failed to set MSR 0x10a"); kvm or tcg force one.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${TLSHD_QEMU_CACHE:-/var/cache/tlshd-qemu}
OUT=${1:?usage: run-guest.sh OUTDIR SCENARIO...}
shift
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || { echo "run-guest: no scenario given" >&2; exit 2; }
TIMEOUT=${TLSHD_QEMU_TIMEOUT:-300}
TRIES=${TLSHD_QEMU_TRIES:-2}
CPUS=${TLSHD_QEMU_CPUS:-2}
MEMORY=${TLSHD_QEMU_MEMORY:-2G}
KERNEL=${TLSHD_QEMU_KERNEL:-6.12}

log() { echo "run-guest: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }
mkdir -p "$CACHE" "$OUT"

# ---- host tools --------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 > /dev/null || need+=(qemu-system-x86)
command -v busybox > /dev/null || need+=(busybox-static)
command -v debootstrap > /dev/null || need+=(debootstrap)
command -v depmod > /dev/null || need+=(kmod)  # virtme-ng runs the host's depmod
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > "$CACHE/apt-install.log"
fi

# ---- the kernels (downloaded, never installed) -------------------------------------------------
# Both kernels' modules go into the one guest root, so both are fetched whichever is booted.
A=$CACHE/apt
mkdir -p "$A/lists/partial" "$A/archives/partial" "$CACHE/deb" "$CACHE/kernels"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
{
    echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie main"
    echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie-backports main"
} > "$A/sources.list"
APTO=(-o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=/dev/null
      -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A" -o "Dir::Cache::Archives=$A/archives"
      -o Dir::State::status=/dev/null)
resolved=$CACHE/kernels/resolved
if [ ! -s "$resolved" ] || [ -n "$(find "$resolved" -mmin +1440)" ]; then
    log "resolving the kernels of trixie and trixie-backports"
    apt-get "${APTO[@]}" update -qq
    : > "$resolved.tmp"
    for suite in trixie trixie-backports; do
        # the metapackage's version in this suite, then the image package it depends on
        ver=$(apt-cache "${APTO[@]}" madison linux-image-amd64 \
              | awk -v s="$suite/main" '$0 ~ s { print $3; exit }')
        img=$(apt-cache "${APTO[@]}" depends "linux-image-amd64=$ver" \
              | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        rel=${img#linux-image-}
        kver=$(apt-cache "${APTO[@]}" madison "$img" | awk '{ print $3; exit }')
        if apt-cache "${APTO[@]}" show "linux-binary-$rel" > /dev/null 2>&1; then
            pkgs="linux-binary-$rel=$kver linux-modules-$rel=$kver"
        else
            pkgs="$img=$kver"
        fi
        echo "${rel%%.*}.$(echo "$rel" | cut -d. -f2) $rel $pkgs" >> "$resolved.tmp"
    done
    mv "$resolved.tmp" "$resolved"
fi
MODULE_TREES=()
VMLINUZ=""
while read -r series rel pkgs; do
    tree=$CACHE/kernels/$rel
    if [ ! -d "$tree/usr/lib/modules/$rel" ]; then
        log "downloading Linux $rel: $pkgs"
        # shellcheck disable=SC2086
        (cd "$CACHE/deb" && apt-get "${APTO[@]}" download $pkgs 2> /dev/null)
        rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
        for p in $pkgs; do
            name=${p%%=*}; version=${p#*=}
            dpkg-deb -x "$CACHE/deb/${name}_$(echo "$version" | sed 's/:/%3a/')_amd64.deb" "$tree.tmp"
        done
        rm -rf "$tree" && mv "$tree.tmp" "$tree"
    fi
    MODULE_TREES+=("$tree")
    if [ "$series" = "$KERNEL" ]; then
        for image in "$tree/boot/vmlinuz-$rel" "$tree/usr/lib/modules/$rel/vmlinuz"; do
            [ -f "$image" ] && { VMLINUZ=$image; break; }
        done
        REL=$rel
    fi
done < "$resolved"
[ -n "$VMLINUZ" ] || { log "no $KERNEL kernel in trixie or trixie-backports: $(cat "$resolved")"; exit 2; }

# ---- the guest's root --------------------------------------------------------------------------
GROOT=$CACHE/trixie
bash "$HERE/make-rootfs.sh" "$GROOT" "${MODULE_TREES[@]}"
# TLSHD_GUEST_REFERENCE=1.4: the reference agent is sid's ktls-utils 1.4.0 (ktls-utils-1.4.sh)
[ "${TLSHD_GUEST_REFERENCE:-}" != 1.4 ] || bash "$HERE/ktls-utils-1.4.sh" "$GROOT"

# ---- virtme-ng ---------------------------------------------------------------------------------
VENV=$CACHE/vng-venv
if [ ! -x "$VENV/bin/vng" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q virtme-ng
fi
export PATH=$VENV/bin:$PATH

# ---- accelerator -------------------------------------------------------------------------------
ACCEL=${TLSHD_QEMU_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
    ACCEL=tcg
    if [ -w /dev/kvm ]; then
        probe=$(timeout --kill-after=5 120 vng --run "$VMLINUZ" --root "$GROOT" --force-9p \
                --cpus 1 --memory 512M --exec "echo tlshd-kvm-probe-ok" < /dev/null 2>&1 || true)
        case "$probe" in *tlshd-kvm-probe-ok*) ACCEL=kvm ;; esac
    fi
fi
ACCEL_OPTS=()
[ "$ACCEL" = tcg ] && ACCEL_OPTS=(--disable-kvm)
echo "RESULT accel=$ACCEL" > "$OUT/host-results"

# ---- boot --------------------------------------------------------------------------------------
GUEST="TLSHD_GUEST_AGENT=${TLSHD_GUEST_AGENT:-tlshd} TLSHD_GUEST_REFERENCE=${TLSHD_GUEST_REFERENCE:-} TLSHD_GUEST_WORKERS=${TLSHD_GUEST_WORKERS:-} TLSHD_GUEST_GROUPS=${TLSHD_GUEST_GROUPS:-} TLSHD_GUEST_PRIVSEP=${TLSHD_GUEST_PRIVSEP:-} TLSHD_GUEST_TRACE=${TLSHD_GUEST_TRACE:-} bash /work/tlshd/scripts/qemu/guest.sh /out ${SCENARIOS[*]}"
log "kernel $REL, virtme-ng $(vng --version 2>&1 | awk '{print $2}'), $ACCEL, output $OUT"
rc=1
for try in $(seq "$TRIES"); do
    # a new try starts from nothing but the record of the earlier ones
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name host-results ! -name 'console.try*' \
        -exec rm -rf {} +
    start=$(date +%s.%N)
    set +e
    # --force-9p: this host's virtiofsd does not start; the kernel has 9p as a module, so
    # virtme-ng builds an initramfs (busybox).
    timeout --kill-after=10 "$TIMEOUT" vng --run "$VMLINUZ" --root "$GROOT" "${ACCEL_OPTS[@]}" \
        --force-9p --cpus "$CPUS" --memory "$MEMORY" --verbose \
        --rodir=/work/tlshd="$REPO" --rwdir=/out="$OUT" \
        --exec "$GUEST" < /dev/null > "$OUT/console.log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" -v t="$try" -v r="$rc" \
        'BEGIN { printf "RESULT boot_try_%d=rc:%d,seconds:%.1f\n", t, r, b - a }' >> "$OUT/host-results"
    if grep -q '^RESULT global.done=yes' "$OUT/results" 2> /dev/null; then rc=0; break; fi
    # The guest did not finish (seen about once in a dozen TCG boots: the VM stops mid-way
    # with nothing on the console). Boot again; the tries stay in host-results and
    # console.tryN.log, and a scenario that fails is a failure whatever the try.
    log "try $try: the guest script did not finish (rc=$rc); see $OUT/console.try$try.log"
    cp "$OUT/console.log" "$OUT/console.try$try.log"
    [ "$rc" = 0 ] && rc=1
done
cat "$OUT/host-results" >&2
[ -f "$OUT/results" ] && cat "$OUT/results"
exit "$rc"
