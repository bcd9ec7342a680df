#!/bin/bash
# Build (once) the Debian trixie root filesystem the real-kernel tier boots over.
#
#   scripts/qemu/make-rootfs.sh ROOTFS KERNEL_DEB
#
# Why trixie: bookworm's nfs-utils 2.6.2 has no `xprtsec=` export option, and the reference
# agent (ktls-utils' tlshd) is only packaged from trixie on. Trixie packages never go onto the
# host (they would pull a newer libc): they live in this chroot, made with debootstrap.
#
# The root holds:
#   - nfs-kernel-server, nfs-common, rpcbind (rpc.nfsd, exportfs, rpc.mountd, mount.nfs);
#   - nvme-cli, keyutils, kmod, udev (virtme-ng's --exec needs udev), iproute2, procps, openssl;
#   - ktls-utils: the reference agent, for side-by-side figures (bench/real_kernel);
#   - /opt/tlshd: a venv with tlshd's runtime dependencies (pip, through the HOST's CA bundle:
#     the chroot's own bundle does not know the proxies the host reaches the registries through);
#   - the kernel's modules (extracted from KERNEL_DEB into /usr/lib/modules, depmod run);
#   - empty mount points /work/tlshd (the checkout, read-only) and /out (results, read-write).
# A stamp file records what was built; a root whose stamp matches is reused as it is.
set -euo pipefail

ROOT=${1:?usage: make-rootfs.sh ROOTFS KERNEL_DEB}
KDEB=${2:?usage: make-rootfs.sh ROOTFS KERNEL_DEB}
MIRROR=${TLSHD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=nfs-kernel-server,nfs-common,rpcbind,ktls-utils,nvme-cli,keyutils,kmod,udev,iproute2,procps,openssl,ca-certificates,python3,python3-venv,util-linux,psmisc
PYDEPS=("pyOpenSSL>=24.3" "cryptography>=43" "pyroute2>=0.7.12")
STAMP_WANT="v1 $PACKAGES ${PYDEPS[*]} $(basename "$KDEB")"
HOST_CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

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

log "tlshd's Python dependencies into /opt/tlshd"
cp "$HOST_CA" "$TMP/etc/host-ca-bundle.pem"
cp /etc/resolv.conf "$TMP/etc/resolv.conf"
mount -t proc proc "$TMP/proc"
chroot "$TMP" python3 -m venv /opt/tlshd
chroot "$TMP" env PIP_CERT=/etc/host-ca-bundle.pem SSL_CERT_FILE=/etc/host-ca-bundle.pem \
    PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /opt/tlshd/bin/pip install -q "${PYDEPS[@]}"
chroot "$TMP" /opt/tlshd/bin/python -c "import OpenSSL, cryptography, pyroute2"
rm -f "$TMP/etc/host-ca-bundle.pem"

log "kernel modules from $(basename "$KDEB")"
K=$(mktemp -d)
dpkg-deb -x "$KDEB" "$K"
for d in "$K"/usr/lib/modules/* "$K"/lib/modules/*; do
    [ -d "$d" ] || continue
    mkdir -p "$TMP/usr/lib/modules"
    rm -rf "$TMP/usr/lib/modules/${d##*/}"
    cp -a "$d" "$TMP/usr/lib/modules/"
    chroot "$TMP" depmod -a "${d##*/}"
done
rm -rf "$K"

# the reference agent must not start by itself; nothing in the guest runs systemd anyway
mkdir -p "$TMP/work/tlshd" "$TMP/out"
umount_all
trap - EXIT
echo "$STAMP_WANT" > "$TMP/.tlshd-stamp"
rm -rf "$ROOT"
mv "$TMP" "$ROOT"
log "done: $(du -sh "$ROOT" | cut -f1)"
