#!/usr/bin/env bash
# Provide a virtiofsd on hosts whose distribution does not package it
# (Debian 12). See docs/ARCHITECTURE.md, "Hosts".
#
# Usage: scripts/fetch-virtiofsd.sh [--force] [PREFIX]
#   PREFIX  install prefix (default $BCVK_VIRTIOFSD_PREFIX or /opt/bcvk/virtiofsd)
#   --force fetch even if the host already has a virtiofsd / PREFIX is current
#           (BCVK_VIRTIOFSD_FORCE=1 does the same)
#
# If the host has a usable virtiofsd (PATH, /usr/libexec/virtiofsd,
# /usr/lib/qemu/virtiofsd) nothing is done. "Usable" means the Rust
# virtiofsd (it takes --shared-dir, --readonly, works rootless): Debian 12's
# qemu-system-common ships QEMU 7.2's legacy C virtiofsd at
# /usr/lib/qemu/virtiofsd, which has another CLI (-o source=...), no
# read-only mode and needs root, so it is skipped. Otherwise the packages
#   virtiofsd libc6 libcap-ng0 libgcc-s1 libseccomp2
# are downloaded from Debian *unstable* with a private sources list and a
# private apt state directory (the host's apt configuration is not touched),
# unpacked with dpkg-deb -x into PREFIX/root, and PREFIX/bin/virtiofsd is
# written: a wrapper that execs virtiofsd through the loader and libc it was
# built against. The fetched versions are recorded in PREFIX/VERSION.
#
# On success the path of the virtiofsd to use is printed on stdout.
set -euo pipefail

FORCE=${BCVK_VIRTIOFSD_FORCE:-0}
if [[ ${1:-} == --force ]]; then FORCE=1; shift; fi
PREFIX=${1:-${BCVK_VIRTIOFSD_PREFIX:-/opt/bcvk/virtiofsd}}
MIRROR=${BCVK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=unstable
PACKAGES=(virtiofsd libc6 libcap-ng0 libgcc-s1 libseccomp2)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf 'fetch-virtiofsd: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case $PREFIX in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac

if [[ $FORCE != 1 ]]; then
    for cand in "$(command -v virtiofsd 2>/dev/null || true)" /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd; do
        if [[ -n $cand && -x $cand && $cand != "$PREFIX/bin/virtiofsd" ]] &&
            "$cand" --help 2>&1 | grep -q -- '--shared-dir'; then
            log "host virtiofsd found: $cand (nothing to do; --force fetches anyway)"
            echo "$cand"
            exit 0
        fi
    done
    if [[ -x $PREFIX/bin/virtiofsd && -f $PREFIX/VERSION ]] &&
        "$PREFIX/bin/virtiofsd" --version >/dev/null 2>&1; then
        log "already installed in $PREFIX ($(grep '^virtiofsd ' "$PREFIX/VERSION" || true))"
        echo "$PREFIX/bin/virtiofsd"
        exit 0
    fi
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool not found (a Debian-based host is needed)"
done
[[ -r $KEYRING ]] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
STATE=$(mktemp -d "$PREFIX/.fetch.XXXXXX")
trap 'rm -rf "$STATE"' EXIT
mkdir -p "$STATE"/{lists/partial,cache/archives/partial,sources.list.d,preferences.d,debs,root}
: >"$STATE/status"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$STATE/sources.list"
APT=(apt-get -q
    -o "Dir::Etc::SourceList=$STATE/sources.list"
    -o "Dir::Etc::SourceParts=$STATE/sources.list.d"
    -o "Dir::Etc::PreferencesParts=$STATE/preferences.d"
    -o "Dir::Etc::Preferences=$STATE/preferences"
    -o "Dir::State=$STATE"
    -o "Dir::State::Lists=$STATE/lists"
    -o "Dir::State::status=$STATE/status"
    -o "Dir::Cache=$STATE/cache"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures=amd64")

log "updating a private package index for $MIRROR $SUITE"
"${APT[@]}" update >"$STATE/apt.log" 2>&1 || { cat "$STATE/apt.log" >&2; die "apt-get update failed"; }
log "downloading ${PACKAGES[*]}"
(cd "$STATE/debs" && "${APT[@]}" download "${PACKAGES[@]}") >>"$STATE/apt.log" 2>&1 ||
    { cat "$STATE/apt.log" >&2; die "apt-get download failed"; }

: >"$STATE/VERSION"
{
    echo "# packages fetched by scripts/fetch-virtiofsd.sh from $MIRROR $SUITE"
    echo "# on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >>"$STATE/VERSION"
for deb in "$STATE"/debs/*.deb; do
    dpkg-deb -x "$deb" "$STATE/root"
    dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/^Package: \(.*\) Version: /\1 /' >>"$STATE/VERSION"
done

# locate the loader, libdir and binary (merged-/usr or not)
R=$STATE/root
LIBDIR=""
for d in usr/lib/x86_64-linux-gnu lib/x86_64-linux-gnu; do
    if [[ -e $R/$d/ld-linux-x86-64.so.2 ]]; then LIBDIR=$d; break; fi
done
[[ -n $LIBDIR ]] || die "ld-linux-x86-64.so.2 not found in the unpacked libc6"
[[ -x $R/usr/libexec/virtiofsd ]] || die "usr/libexec/virtiofsd not found in the unpacked virtiofsd package"

# install: swap root/ and VERSION in, then write the wrapper
rm -rf "$PREFIX/root.old"
[[ -d $PREFIX/root ]] && mv "$PREFIX/root" "$PREFIX/root.old"
mv "$STATE/root" "$PREFIX/root"
rm -rf "$PREFIX/root.old"
mv "$STATE/VERSION" "$PREFIX/VERSION"
mkdir -p "$PREFIX/bin"
cat >"$PREFIX/bin/virtiofsd.tmp" <<EOF
#!/bin/sh
# virtiofsd from Debian $SUITE, run with the loader and libraries it was
# built against (written by bcvk scripts/fetch-virtiofsd.sh; see ../VERSION).
# exec: signals sent to this wrapper's pid reach virtiofsd itself.
exec "$PREFIX/root/$LIBDIR/ld-linux-x86-64.so.2" --library-path "$PREFIX/root/$LIBDIR" "$PREFIX/root/usr/libexec/virtiofsd" "\$@"
EOF
chmod 0755 "$PREFIX/bin/virtiofsd.tmp"
mv "$PREFIX/bin/virtiofsd.tmp" "$PREFIX/bin/virtiofsd"

if ! out=$("$PREFIX/bin/virtiofsd" --version 2>&1); then
    die "the installed wrapper does not run: $out"
fi
log "installed $PREFIX/bin/virtiofsd: $out"
echo "$PREFIX/bin/virtiofsd"
