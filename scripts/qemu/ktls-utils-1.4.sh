#!/bin/bash
# ktls-utils 1.4.0 (Debian sid) for the side-by-side runs, unpacked into the guest root under
# /opt/ktls-utils-1.4 with the two libraries sid's build needs newer than trixie has (GnuTLS
# >= 3.8.11, libnl >= 3.11); trixie's own ktls-utils 1.0.0 stays /usr/sbin/tlshd. Nothing is
# installed (dpkg-deb -x only), on the host or in the root. The .debs are pinned by SHA-256, as
# read from sid's Packages.xz on 2026-12-07, whose hash matched the InRelease signed by the
# Debian archive key (gpgv); a package that left sid's pool is fetched from snapshot.debian.org.
#
#   scripts/qemu/ktls-utils-1.4.sh ROOT          (idempotent; run-guest.sh calls it)
#
# In the guest: LD_LIBRARY_PATH=/opt/ktls-utils-1.4/usr/lib/x86_64-linux-gnu \
#               /opt/ktls-utils-1.4/usr/sbin/tlshd
set -euo pipefail
ROOT=${1:?usage: ktls-utils-1.4.sh ROOT}
CACHE=${TLSHD_QEMU_CACHE:-/var/cache/tlshd-qemu}/deb
DEST=$ROOT/opt/ktls-utils-1.4
PACKAGES=(
    "k/ktls-utils/ktls-utils_1.4.0-1_amd64.deb 29ccb9b666886879d7662469558b40462c7fcb814591fd1095617eeecfa7d321"
    "g/gnutls28/libgnutls30t64_3.8.13-1_amd64.deb 81f7f28a3968228293cabf6a92f7d6b2a8807f64ccf57469f2ce9a06b7b226af"
    "libn/libnl3/libnl-3-200_3.12.0-2+b1_amd64.deb a5ca78bbb9d5cc067b78952c5d38b7caac831d42e94b85b91edf1f6f00dfd48a"
    "libn/libnl3/libnl-genl-3-200_3.12.0-2+b1_amd64.deb a4d295d6c273216a2dd6de7890f0f0da0a02963cb3cd366c726028922dc6ee15"
)
[ -x "$DEST/usr/sbin/tlshd" ] && exit 0
mkdir -p "$CACHE" "$DEST.tmp"
for entry in "${PACKAGES[@]}"; do
    read -r path sum <<< "$entry"
    deb=$CACHE/$(basename "$path")
    if ! echo "$sum  $deb" | sha256sum -c --status 2> /dev/null; then
        echo "ktls-utils-1.4: fetching $(basename "$path")" >&2
        curl -fsS -o "$deb" "http://deb.debian.org/debian/pool/main/$path" ||
            curl -fsS -o "$deb" "https://snapshot.debian.org/archive/debian/20261207T000000Z/pool/main/$path"
        echo "$sum  $deb" | sha256sum -c --status || { echo "ktls-utils-1.4: $deb: bad SHA-256" >&2; exit 1; }
    fi
    dpkg-deb -x "$deb" "$DEST.tmp"
done
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
