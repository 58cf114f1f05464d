#!/bin/bash
# Builds the arm64 Linux guest tests/fidelity_arm.rs boots beside the aarch64 probe:
#   $DIR/vmlinuz           Debian 12's arm64 kernel image (from apt, package linux-image-*-arm64)
#   $DIR/initramfs.cpio.gz newc cpio (gzip) with busybox-static (arm64) and an /init that prints,
#                          between markers on the serial console, /proc/cpuinfo, every file under
#                          /sys/devices/system/cpu/cpu0/regs/identification/ (`name=value`) and the
#                          kernel's CPU-feature boot messages, then powers off
#   $DIR/config            the kernel's build configuration (/boot/config-*), which decides some
#                          hwcaps (tests/support/hwcaps.rs KernelConfig)
#   $DIR/stamp             what the two files were built from; a rerun with the same inputs does
#                          nothing
# DIR is $CPUGUARD_LINUX_GUEST_ARM64_DIR or /var/tmp/cpuguard-linux-guest-arm64. Run as root on
# Debian 12 (any architecture).
#
# The arm64 packages are fetched with `apt-get download` against a private apt state under
# $DIR/apt (own package lists, own cache, empty dpkg status, arm64 as the only architecture),
# built from the host's own sources and keyrings. Nothing is installed and the host's dpkg
# configuration is left alone: `dpkg --add-architecture arm64` would make every later
# `apt-get update` on the host fetch arm64 lists too. The private lists are fetched once;
# `rm -rf $DIR/apt` makes the next run fetch current ones (and rebuild if the kernel changed).
set -euo pipefail
# Byte lengths in the newc writer below: ${#name} must count bytes.
export LC_ALL=C

DIR=${CPUGUARD_LINUX_GUEST_ARM64_DIR:-/var/tmp/cpuguard-linux-guest-arm64}
SELF=$(readlink -f "$0")
# Keep these in step with tests/support/linux_guest_arm.rs.
BEGIN_MARKER='=====CPUGUARD-ARM64-BEGIN====='
CPUINFO_MARKER='=====CPUGUARD-ARM64-CPUINFO====='
IDREGS_MARKER='=====CPUGUARD-ARM64-IDREGS====='
DMESG_MARKER='=====CPUGUARD-ARM64-DMESG====='
END_MARKER='=====CPUGUARD-ARM64-END====='

die() { echo "fetch-linux-guest-arm64: $*" >&2; exit 1; }
bytes_hex() { # file offset count -> lowercase hex, no spaces
    od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

[ "$(id -u)" = 0 ] || die "must run as root (apt-get download into $DIR)"
for tool in apt-get apt-cache dpkg-deb gzip sha256sum od stat find; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian 12 expected)"
done

APT="$DIR/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$DIR/debs"
touch "$APT/status"
chmod 0755 "$DIR" "$DIR/debs" "$APT" "$APT/lists" "$APT/cache"
APT_OPTS=(
    # Downloads run as root: _apt cannot write into these root-owned directories (apt would
    # fall back to root with a warning). Every file is still verified against the signed lists.
    -o "APT::Sandbox::User=root"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::State::status=$APT/status"
    -o "Dir::Cache=$APT/cache"
    -o "Dir::Cache::pkgcache=$APT/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$APT/cache/srcpkgcache.bin"
    -o "APT::Architecture=arm64"
    -o "APT::Architectures=arm64"
    -o "Acquire::Languages=none"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
)

# The kernel: the meta package names the current ABI package (e.g. linux-image-6.1.0-56-arm64).
kernel_package() {
    apt-cache "${APT_OPTS[@]}" depends linux-image-arm64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true
}
candidate() {
    apt-cache "${APT_OPTS[@]}" policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}' || true
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ] || [ -z "$(candidate busybox-static)" ]; then
    # First run (or lists removed): fetch the arm64 lists. A third-party source without arm64
    # may fail here; what counts is whether Debian's packages resolve afterwards.
    apt-get "${APT_OPTS[@]}" update >&2 || echo "fetch-linux-guest-arm64: apt-get update reported errors" >&2
    KPKG=$(kernel_package)
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-arm64 to a kernel package (apt sources for Debian 12 main?)"
KVER=$(candidate "$KPKG")
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version for $KPKG (arm64)"
BBVER=$(candidate busybox-static)
[ -n "$BBVER" ] && [ "$BBVER" != "(none)" ] || die "no candidate version for busybox-static (arm64)"

SCRIPT_SUM=$(sha256sum "$SELF" | cut -d' ' -f1)
STAMP="kernel=$KPKG=$KVER busybox=$BBVER arch=arm64 script=$SCRIPT_SUM"
if [ -s "$DIR/vmlinuz" ] && [ -s "$DIR/initramfs.cpio.gz" ] && [ -s "$DIR/config" ] && [ -f "$DIR/stamp" ] \
    && [ "$(cat "$DIR/stamp")" = "$STAMP" ]; then
    echo "fetch-linux-guest-arm64: up to date in $DIR ($KPKG $KVER)"
    exit 0
fi

fetch_deb() { # name version -> prints the .deb path
    local name=$1 version=$2 file
    file=$(ls "${name}"_*_arm64.deb 2>/dev/null | head -n1 || true)
    if [ -z "$file" ] || [ "$(dpkg-deb -f "$file" Version)" != "$version" ]; then
        rm -f "${name}"_*_arm64.deb
        apt-get "${APT_OPTS[@]}" download "${name}:arm64=${version}" >&2 \
            || die "apt-get download ${name}:arm64=${version} failed"
        file=$(ls "${name}"_*_arm64.deb | head -n1)
    fi
    [ "$(dpkg-deb -f "$file" Architecture)" = arm64 ] || die "$file is not an arm64 package"
    echo "$DIR/debs/$file"
}
cd "$DIR/debs"
KDEB=$(fetch_deb "$KPKG" "$KVER")
BBDEB=$(fetch_deb busybox-static "$BBVER")

WORK=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Kernel image only: the PL011 console, virtio-less initramfs boot and /proc, /sys are built in.
mkdir "$WORK/kernel"
dpkg-deb -x "$KDEB" "$WORK/kernel"
KIMG=$(ls "$WORK"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$KIMG" ] || die "$KDEB holds no boot/vmlinuz-*"
KCONFIG=$(ls "$WORK"/kernel/boot/config-* 2>/dev/null | head -n1)
[ -n "$KCONFIG" ] || die "$KDEB holds no boot/config-*"
# Debian's arm64 vmlinuz is a gzip'd Image; QEMU's -kernel unpacks gzip itself, but an
# uncompressed Image boots on any QEMU, so it is stored unpacked.
if [ "$(bytes_hex "$KIMG" 0 2)" = 1f8b ]; then
    gzip -dc "$KIMG" >"$WORK/vmlinuz"
else
    cp "$KIMG" "$WORK/vmlinuz"
fi
# The arm64 Image header carries the magic "ARM\x64" at offset 56.
[ "$(bytes_hex "$WORK/vmlinuz" 56 4)" = 41524d64 ] || die "$KIMG is not an arm64 Image"

mkdir "$WORK/bb"
dpkg-deb -x "$BBDEB" "$WORK/bb"
BUSYBOX="$WORK/bb/bin/busybox"
[ -f "$BUSYBOX" ] || die "$BBDEB holds no bin/busybox"
# ELF (7f 45 4c 46), e_machine (offset 18, little-endian) 0xb7 = AArch64.
[ "$(bytes_hex "$BUSYBOX" 0 4)" = 7f454c46 ] && [ "$(bytes_hex "$BUSYBOX" 18 2)" = b700 ] \
    || die "$BUSYBOX is not an aarch64 ELF executable"

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in sh mount echo cat poweroff dmesg grep; do
    ln -s busybox "$ROOT/bin/$applet"
done

cat >"$ROOT/init" <<EOF
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Kernel messages must not interleave with the dump on the console.
echo 0 > /proc/sys/kernel/printk
echo '$BEGIN_MARKER'
echo '$CPUINFO_MARKER'
cat /proc/cpuinfo
echo '$IDREGS_MARKER'
for f in /sys/devices/system/cpu/cpu0/regs/identification/*; do
    [ -f "\$f" ] && echo "\${f##*/}=\$(cat "\$f")"
done
echo '$DMESG_MARKER'
# What the kernel decided about the CPU (reasons for a hwcap it left out).
dmesg | grep -iE 'CPU features|detected|SVE|SME|MTE|authentication|Linux version' || true
echo '$END_MARKER'
/bin/busybox poweroff -f
EOF
chmod 0755 "$ROOT/init"

# The archive: the arm64 busybox's cpio cannot run on this host and Debian's cpio package is not
# always installed, so the newc format (kernel's Documentation/driver-api/early-userspace/
# buffer-format.rst) is written here: entries sorted, owned by root, mtime 0.
write_newc() { # writes the newc archive of $ROOT to stdout, files owned by root, mtime 0
    local ino=1 path rel mode size nlink target
    cd "$ROOT"
    while IFS= read -r rel; do
        path="$ROOT/$rel"
        if [ -L "$path" ]; then
            target=$(readlink "$path")
            mode=$((0120777)); size=${#target}; nlink=1
        elif [ -d "$path" ]; then
            mode=$((040755)); size=0; nlink=2
        else
            mode=$((0100000 | 0$(stat -c %a "$path"))); size=$(stat -c %s "$path"); nlink=1
        fi
        newc_entry "$rel" "$ino" "$mode" "$nlink" "$size"
        if [ -L "$path" ]; then printf '%s' "$target"; elif [ -f "$path" ]; then cat "$path"; fi
        pad $(( (4 - size % 4) % 4 ))
        ino=$((ino + 1))
    done < <(find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort)
    newc_entry "TRAILER!!!" 0 0 1 0
}
newc_entry() { # name ino mode nlink filesize
    local name=$1 namesize=$((${#1} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$2" "$3" 0 0 "$4" 0 "$5" 0 0 0 0 "$namesize" 0
    printf '%s\0' "$name"
    pad $(( (4 - (110 + namesize) % 4) % 4 ))
}
pad() { [ "$1" -gt 0 ] && head -c "$1" /dev/zero; return 0; }

write_newc | gzip -9n >"$WORK/initramfs.cpio.gz"
[ -s "$WORK/initramfs.cpio.gz" ] || die "initramfs is empty"

mv -f "$WORK/vmlinuz" "$DIR/vmlinuz"
cp "$KCONFIG" "$DIR/config"
mv -f "$WORK/initramfs.cpio.gz" "$DIR/initramfs.cpio.gz"
echo "$STAMP" >"$DIR/stamp.new" && mv -f "$DIR/stamp.new" "$DIR/stamp"
echo "fetch-linux-guest-arm64: built $DIR/vmlinuz ($KPKG $KVER) and $DIR/initramfs.cpio.gz"
