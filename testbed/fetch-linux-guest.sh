#!/bin/bash
# Builds the Linux guest the fidelity test (tests/fidelity_linux.rs) boots beside the probe:
#   $DIR/vmlinuz          a Debian kernel (from apt, never the host's: this machine's kernel may
#                         be anything, e.g. a microVM kernel without a serial console)
#   $DIR/initramfs.cpio.gz newc cpio (gzip) with busybox-static, cpuid and its shared libraries,
#                         and an /init that prints `cpuid -r` (then the extra sub-leaves named
#                         by `cpuguard.leaves=` on the kernel command line) between markers on
#                         the serial console and powers off
#   $DIR/stamp            what the two files were built from; a rerun with the same inputs
#                         does nothing
# DIR is $CPUGUARD_LINUX_GUEST_DIR or /var/tmp/cpuguard-linux-guest. Run as root on Debian 12.
# Everything comes from apt: the kernel and busybox-static are fetched with `apt-get download`
# and unpacked (not installed); the `cpuid` tool is apt-get installed only if it is missing.
set -euo pipefail

DIR=${CPUGUARD_LINUX_GUEST_DIR:-/var/tmp/cpuguard-linux-guest}
SELF=$(readlink -f "$0")
# Keep these in step with tests/support/linux_guest.rs.
BEGIN_MARKER='=====CPUGUARD-CPUID-BEGIN====='
END_MARKER='=====CPUGUARD-CPUID-END====='
EXTRA_MARKER='=====CPUGUARD-CPUID-EXTRA====='

die() { echo "fetch-linux-guest: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get download into $DIR)"
for tool in apt-get apt-cache dpkg-deb ldd gzip sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian 12 expected)"
done
CPUID_BIN=$(command -v cpuid || true)
if [ -z "$CPUID_BIN" ]; then
    apt-get install -y --no-install-recommends cpuid >/dev/null || die "cannot install cpuid"
    CPUID_BIN=$(command -v cpuid) || die "cpuid not found after install"
fi

mkdir -p "$DIR/debs"
cd "$DIR/debs"
# apt downloads as root here (its _apt sandbox user cannot write to this directory) and still
# verifies every package against the signed lists.
chmod 0755 "$DIR" "$DIR/debs"

# The kernel: the meta package names the current ABI package (e.g. linux-image-6.1.0-56-amd64).
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ]; then
    # A fresh CI image may have no package lists yet.
    apt-get update >/dev/null 2>&1 || true
    KPKG=$(kernel_package)
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package (apt sources for Debian 12 main?)"
KVER=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version for $KPKG"
BBVER=$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')
[ -n "$BBVER" ] && [ "$BBVER" != "(none)" ] || die "no candidate version for busybox-static"

SCRIPT_SUM=$(sha256sum "$SELF" | cut -d' ' -f1)
CPUID_SUM=$(sha256sum "$CPUID_BIN" | cut -d' ' -f1)
STAMP="kernel=$KPKG=$KVER busybox=$BBVER cpuid=$CPUID_SUM script=$SCRIPT_SUM"
if [ -s "$DIR/vmlinuz" ] && [ -s "$DIR/initramfs.cpio.gz" ] && [ -f "$DIR/stamp" ] \
    && [ "$(cat "$DIR/stamp")" = "$STAMP" ]; then
    echo "fetch-linux-guest: up to date in $DIR ($KPKG $KVER)"
    exit 0
fi

fetch_deb() { # name version -> prints the .deb path
    local name=$1 version=$2 file
    file=$(ls "${name}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$file" ] || [ "$(dpkg-deb -f "$file" Version)" != "$version" ]; then
        rm -f "${name}"_*.deb
        apt-get download "${name}=${version}" >/dev/null 2>&1 \
            || apt-get download "${name}=${version}" >&2 \
            || die "apt-get download ${name}=${version} failed"
        file=$(ls "${name}"_*.deb | head -n1)
    fi
    echo "$DIR/debs/$file"
}
KDEB=$(fetch_deb "$KPKG" "$KVER")
BBDEB=$(fetch_deb busybox-static "$BBVER")

WORK=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Kernel image only; the guest needs no modules (serial 8250, initramfs and cpio are built in,
# and `cpuid` executes the CPUID instruction itself).
mkdir "$WORK/kernel"
dpkg-deb -x "$KDEB" "$WORK/kernel"
KIMG=$(ls "$WORK"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$KIMG" ] || die "$KDEB holds no boot/vmlinuz-*"

mkdir "$WORK/bb"
dpkg-deb -x "$BBDEB" "$WORK/bb"
BUSYBOX="$WORK/bb/bin/busybox"
[ -x "$BUSYBOX" ] || die "$BBDEB holds no bin/busybox"

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,usr/bin}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in sh mount echo cat poweroff sleep; do
    ln -s busybox "$ROOT/bin/$applet"
done
cp "$CPUID_BIN" "$ROOT/usr/bin/cpuid"
# Every shared object ldd resolves, at its own path (the loader included).
ldd "$CPUID_BIN" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
while read -r lib; do
    [ -e "$lib" ] || die "ldd names $lib, which does not exist"
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done

cat >"$ROOT/init" <<EOF
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Kernel messages must not interleave with the dump on the console.
echo 0 > /proc/sys/kernel/printk
echo '$BEGIN_MARKER'
/usr/bin/cpuid -r
echo "cpuid-exit=\$?"
# Sub-leaves \`cpuid -r\` does not list but the test wants read too: cpuguard.leaves=L:S,L:S
# (hex without 0x) on the kernel command line.
LEAVES=
for arg in \$(cat /proc/cmdline); do
    case "\$arg" in cpuguard.leaves=*) LEAVES="\${arg#cpuguard.leaves=}" ;; esac
done
echo '$EXTRA_MARKER'
IFS=,
for pair in \$LEAVES; do
    /usr/bin/cpuid -r -1 -l "0x\${pair%:*}" -s "0x\${pair#*:}" || echo "cpuid-exit=\$?"
done
unset IFS
echo '$END_MARKER'
/bin/busybox poweroff -f
EOF
chmod 0755 "$ROOT/init"

# Archive built with the packaged busybox's cpio (no cpio package needed), files owned by root.
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) \
    | gzip -9n >"$WORK/initramfs.cpio.gz"
[ -s "$WORK/initramfs.cpio.gz" ] || die "initramfs is empty"

cp "$KIMG" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$DIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$DIR/initramfs.cpio.gz"
echo "$STAMP" >"$DIR/stamp.new" && mv -f "$DIR/stamp.new" "$DIR/stamp"
echo "fetch-linux-guest: built $DIR/vmlinuz ($KPKG $KVER) and $DIR/initramfs.cpio.gz"
