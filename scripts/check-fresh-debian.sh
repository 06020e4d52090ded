#!/usr/bin/env bash
# Runs the README's main command on a bare Debian (no python3, no gcc: debootstrap's minbase),
# in a chroot, from a copy of this checkout: proves the install works from nothing.
# Needs root, debootstrap and the Debian mirror; about 2 minutes for the chroot, 2 for the run.
#
#   sudo bash scripts/check-fresh-debian.sh [SUITE] [DIR]     # default: bookworm /tmp/lamina-fresh-SUITE
#
# The host's pip configuration, CA certificates and local wheel directories (/opt/wheels,
# /opt/pypi*) are carried into the chroot where present, so it reaches the same package
# indexes as the host. Afterwards the chroot stays (rm -rf DIR after unmounting; the script
# unmounts what it mounted on exit).
set -euo pipefail
SUITE="${1:-bookworm}"
ROOT_DIR="${2:-/tmp/lamina-fresh-$SUITE}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "check-fresh-debian.sh: run as root (chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

if [ ! -x "$ROOT_DIR/bin/bash" ]; then
    debootstrap --variant=minbase "$SUITE" "$ROOT_DIR" http://deb.debian.org/debian >/dev/null
fi
mounted=()
cleanup() { for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$ROOT_DIR$2"; mount --bind "$1" "$ROOT_DIR$2"; mounted+=("$ROOT_DIR$2"); }
mount -t proc proc "$ROOT_DIR/proc"; mounted+=("$ROOT_DIR/proc")
bind /dev /dev
bind /dev/pts /dev/pts
for d in /opt/wheels /opt/pypi /opt/pypi-more; do [ -d "$d" ] && bind "$d" "$d"; done
cp /etc/resolv.conf "$ROOT_DIR/etc/"
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt; do
    [ -f "$f" ] && mkdir -p "$ROOT_DIR$(dirname "$f")" && cp "$f" "$ROOT_DIR$f"
done
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    mkdir -p "$ROOT_DIR/usr/local/share/ca-certificates" "$ROOT_DIR/etc/ssl/certs"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT_DIR/usr/local/share/ca-certificates/"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT_DIR/etc/ssl/certs/"
fi

rm -rf "$ROOT_DIR/root/lamina" && mkdir -p "$ROOT_DIR/root/lamina"
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - 2>/dev/null) |
    (cd "$ROOT_DIR/root/lamina" && tar xf -)
pip_env=()
for v in PIP_FIND_LINKS PIP_DEFAULT_TIMEOUT PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    [ -n "${!v:-}" ] && pip_env+=("$v=${!v}")
done
[ -f /etc/ssl/certs/ca-certificates.crt ] && pip_env+=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
echo "check-fresh-debian.sh: Debian $(cat "$ROOT_DIR/etc/debian_version"), python3: $(chroot "$ROOT_DIR" sh -c 'command -v python3 || echo none')" >&2
time chroot "$ROOT_DIR" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    "${pip_env[@]}" /bin/bash -c 'cd /root/lamina && bash scripts/demo.sh'
