#!/bin/bash
# Build (once) the Debian trixie root filesystem the real-kernel tier boots over.
#
#   scripts/qemu/make-rootfs.sh ROOTFS KERNEL_TREE...
#
# Why trixie: bookworm's nfs-utils 2.6.2 has no `xprtsec=` export option, and the reference
# agent (ktls-utils' tlshd) is only packaged from trixie on. Trixie packages never go onto the
# host (they would pull a newer libc): they live in this chroot, made with debootstrap.
#
# The root holds:
#   - nfs-kernel-server, nfs-common, rpcbind (rpc.nfsd, exportfs, rpc.mountd, mount.nfs);
#   - nvme-cli, keyutils, kmod, udev (virtme-ng's --exec needs udev), iproute2, procps, openssl;
#   - curl: an unmodified client under `tlshd wrap` (the app_wrap scenario);
#   - ktls-utils: the reference agent, for side-by-side figures (bench/real_kernel);
#   - python3 with Debian's python3-openssl, python3-cryptography and python3-pyroute2: the
#     agent runs from the checkout on these, as a user of the distribution would run it;
#   - each kernel's modules (from the extracted KERNEL_TREEs into /usr/lib/modules, depmod run);
#   - empty mount points /work/tlshd (the checkout, read-only) and /out (results, read-write).
# A stamp file records what was built; a root whose stamp matches is reused as it is.
set -euo pipefail

ROOT=${1:?usage: make-rootfs.sh ROOTFS KERNEL_TREE...}
shift
TREES=("$@")
[ ${#TREES[@]} -gt 0 ] || { echo "usage: make-rootfs.sh ROOTFS KERNEL_TREE..." >&2; exit 2; }
MIRROR=${TLSHD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-openssl, python3-cryptography, python3-pyroute2: the agent runs on Debian's own
# packages (and so on the system OpenSSL), not on wheels.
PACKAGES=nfs-kernel-server,nfs-common,rpcbind,ktls-utils,nvme-cli,keyutils,kmod,udev,iproute2,procps,openssl,ca-certificates,python3,python3-cffi-backend,python3-openssl,python3-cryptography,python3-pyroute2,util-linux,psmisc,curl
STAMP_WANT="v2 $PACKAGES $(for t in "${TREES[@]}"; do basename "$t"; done | sort | paste -sd' ')"

log() { echo "make-rootfs: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }
if [ -f "$ROOT/.tlshd-stamp" ] && [ "$(cat "$ROOT/.tlshd-stamp")" = "$STAMP_WANT" ]; then
    exit 0
fi
command -v debootstrap > /dev/null || {
    log "installing debootstrap (host suite)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null
}

TMP=$ROOT.tmp
umount_all() {
    for m in proc sys dev; do mountpoint -q "$TMP/$m" && umount -l "$TMP/$m"; done
    return 0
}
trap umount_all EXIT
umount_all 2> /dev/null || true
rm -rf "$TMP"
log "debootstrap trixie into $TMP (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" trixie "$TMP" "$MIRROR" \
    > "$ROOT.debootstrap.log" 2>&1 || { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }

mount -t proc proc "$TMP/proc"
chroot "$TMP" python3 -c "import OpenSSL, cryptography, pyroute2"

for tree in "${TREES[@]}"; do
    for d in "$tree"/usr/lib/modules/* "$tree"/lib/modules/*; do
        [ -d "$d" ] || continue
        log "kernel modules of ${d##*/}"
        mkdir -p "$TMP/usr/lib/modules"
        rm -rf "$TMP/usr/lib/modules/${d##*/}"
        cp -a "$d" "$TMP/usr/lib/modules/"
        rm -f "$TMP/usr/lib/modules/${d##*/}/vmlinuz"
        chroot "$TMP" depmod -a "${d##*/}"
    done
done

# the reference agent must not start by itself; nothing in the guest runs systemd anyway
mkdir -p "$TMP/work/tlshd" "$TMP/out"
umount_all
trap - EXIT
echo "$STAMP_WANT" > "$TMP/.tlshd-stamp"
rm -rf "$ROOT"
mv "$TMP" "$ROOT"
log "done: $(du -sh "$ROOT" | cut -f1)"
