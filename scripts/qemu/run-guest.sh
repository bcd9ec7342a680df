#!/bin/bash
# Host side of the real-kernel tier: boot Debian's 6.12 kernel under QEMU (TCG) with virtme-ng
# over this host's root filesystem and run scripts/qemu/guest-nvme.sh inside it.
#
#   scripts/qemu/run-guest.sh [OUTDIR]
#
# Needs root and the package registries (first run only). Cached under $TLSHD_QEMU_CACHE
# (default var/qemu in the repository, which .gitignore covers): the kernel .deb and its extracted tree, a venv with
# virtme-ng. The kernel's modules are made visible as /lib/modules/<release> (a symlink into the
# cache, plus depmod for that release: files only, no package is installed from backports).
# Host packages from the host's own suite: qemu-system-x86, busybox-static, udev, kmod.
#
# OUTDIR (default $CACHE/out/<time>) receives console.log (the kernel console and the guest's
# output), results (RESULT lines) and the guest's artefacts. Exit status: 0 when the guest
# script ran to its end, else non-zero. A boot that prints nothing of the guest script is
# retried once ($TLSHD_QEMU_TRIES).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# not under /var/cache, /var/tmp or /tmp: virtme-ng mounts tmpfs there in the guest, and the
# guest must see the modules through the /lib/modules symlink
CACHE=${TLSHD_QEMU_CACHE:-$REPO/var/qemu}
OUT=${1:-$CACHE/out/$(date +%Y%m%d-%H%M%S)}
TIMEOUT=${TLSHD_QEMU_TIMEOUT:-300}
TRIES=${TLSHD_QEMU_TRIES:-2}
CPUS=${TLSHD_QEMU_CPUS:-2}
MEMORY=${TLSHD_QEMU_MEMORY:-2G}
# a kernel package name, or "auto": the one bookworm-backports' linux-image-amd64 depends on
KPKG=${TLSHD_QEMU_KERNEL_PKG:-auto}

log() { echo "run-guest: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }
mkdir -p "$CACHE" "$OUT"

# ---- host tools --------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 > /dev/null || need+=(qemu-system-x86)
command -v busybox > /dev/null || need+=(busybox-static)
command -v udevadm > /dev/null || need+=(udev)
command -v depmod > /dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > "$CACHE/apt-install.log"
fi

# ---- the kernel (downloaded, never installed) --------------------------------------------------
KROOT=$CACHE/root
if ! ls "$KROOT"/boot/vmlinuz-* > /dev/null 2>&1; then
    A=$CACHE/apt
    mkdir -p "$A/lists/partial" "$A/archives/partial" "$CACHE/deb"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian bookworm-backports main" > "$A/sources.list"
    APTO=(-o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=/dev/null
          -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A" -o "Dir::Cache::Archives=$A/archives")
    apt-get "${APTO[@]}" update -qq
    if [ "$KPKG" = auto ]; then
        KPKG=$(apt-cache "${APTO[@]}" depends linux-image-amd64 \
               | awk '/Depends: linux-image-6\.12/ { print $2; exit }')
    fi
    [ -n "$KPKG" ] || { log "no linux-image-6.12 package found in bookworm-backports"; exit 2; }
    log "downloading $KPKG"
    (cd "$CACHE/deb" && apt-get "${APTO[@]}" download "$KPKG" 2> /dev/null)
    rm -rf "$KROOT.tmp" && mkdir -p "$KROOT.tmp"
    dpkg-deb -x "$(ls -t "$CACHE"/deb/linux-image-*.deb | head -1)" "$KROOT.tmp"
    rm -rf "$KROOT" && mv "$KROOT.tmp" "$KROOT"
fi
VMLINUZ=$(ls "$KROOT"/boot/vmlinuz-* | sort -V | tail -1)
REL=${VMLINUZ##*/vmlinuz-}
MODS=$KROOT/lib/modules/$REL
[ -d "$MODS" ] || MODS=$KROOT/usr/lib/modules/$REL
mkdir -p /lib/modules
if [ ! -e "/lib/modules/$REL" ]; then
    ln -s "$MODS" "/lib/modules/$REL"
elif [ "$(readlink -f "/lib/modules/$REL")" != "$(readlink -f "$MODS")" ]; then
    log "/lib/modules/$REL exists and is not ours; using it as it is"
fi
[ -f "/lib/modules/$REL/modules.dep.bin" ] || depmod -a "$REL"

# ---- virtme-ng ---------------------------------------------------------------------------------
VENV=$CACHE/vng-venv
if [ ! -x "$VENV/bin/vng" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q virtme-ng
fi
export PATH=$VENV/bin:$PATH

# ---- boot --------------------------------------------------------------------------------------
GUEST="bash $HERE/guest-nvme.sh $OUT"
log "kernel $REL, virtme-ng $(vng --version 2>&1 | awk '{print $2}'), output $OUT"
rc=1
rm -f "$OUT/host-results"
for try in $(seq "$TRIES"); do
    rm -f "$OUT/results"
    start=$(date +%s.%N)
    set +e
    # --force-9p: this host's virtiofsd does not start; the kernel has 9p as a module, so
    # virtme-ng builds an initramfs (busybox). TCG: nested KVM fails on these machines.
    timeout --kill-after=10 "$TIMEOUT" vng --run "$VMLINUZ" --disable-kvm --force-9p \
        --cpus "$CPUS" --memory "$MEMORY" --verbose --rwdir="$OUT" \
        --exec "$GUEST" < /dev/null > "$OUT/console.log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" -v t="$try" -v r="$rc" \
        'BEGIN { printf "RESULT boot_try_%d=rc:%d,seconds:%.1f\n", t, r, b - a }' >> "$OUT/host-results"
    if grep -q '^RESULT done=yes' "$OUT/results" 2> /dev/null; then rc=0; break; fi
    if grep -q '^GUEST: ' "$OUT/console.log"; then break; fi   # the guest ran: do not hide a failure
    log "try $try: no output from the guest script (rc=$rc); see $OUT/console.log"
    cp "$OUT/console.log" "$OUT/console.try$try.log"
    [ "$rc" = 0 ] && rc=1
done
cat "$OUT/host-results" >&2
[ -f "$OUT/results" ] && cat "$OUT/results"
exit "$rc"
