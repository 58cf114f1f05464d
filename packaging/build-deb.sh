#!/usr/bin/env bash
# Builds cpuguard_VERSION_amd64.deb with dpkg-deb from binaries built beforehand (no cargo here,
# as for the RPM). The maintainer scripts do what the RPM's do (packaging/deb/).
#
#   packaging/build-deb.sh BIN_DIR OUT_DIR      # e.g. target/release dist/
set -euo pipefail

bin_dir=${1:?usage: build-deb.sh BIN_DIR OUT_DIR}
out_dir=${2:?usage: build-deb.sh BIN_DIR OUT_DIR}
src=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$src/Cargo.toml" | head -n1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/cpuguard
install -D -m 0755 "$bin_dir/cpuguard" "$root/usr/bin/cpuguard"
install -D -m 0755 "$bin_dir/cpuguard-libvirt" "$root/usr/libexec/cpuguard/cpuguard-libvirt"
install -D -m 0644 "$src/packaging/cpuguard.toml" "$root/etc/cpuguard/cpuguard.toml"
install -D -m 0644 "$src/packaging/cpuguard.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/cpuguard.conf"
install -d -m 0755 "$root/usr/share/man/man8"
gzip -9n <"$src/packaging/cpuguard.8" >"$root/usr/share/man/man8/cpuguard.8.gz"
chmod 0644 "$root/usr/share/man/man8/cpuguard.8.gz"
install -d -m 0700 "$root/var/cache/cpuguard"

install -d -m 0755 "$root/DEBIAN"
sed "s/@VERSION@/$version/" "$src/packaging/deb/control" >"$root/DEBIAN/control"
install -m 0644 "$src/packaging/deb/conffiles" "$root/DEBIAN/conffiles"
install -m 0755 "$src/packaging/deb/postinst" "$root/DEBIAN/postinst"
install -m 0755 "$src/packaging/deb/prerm" "$root/DEBIAN/prerm"

mkdir -p "$out_dir"
dpkg-deb --root-owner-group --build "$root" "$out_dir/cpuguard_${version}_amd64.deb" >&2
echo "$out_dir/cpuguard_${version}_amd64.deb"
