#!/bin/sh
# Make the Dockerfile's base image available to the local engine: present already, pulled, or, where no image
# registry can be reached, built from Debian's own packages with debootstrap (minbase) and imported under the same
# name. Either way the Dockerfile builds FROM the same name.
#   docker/base-image.sh debian:trixie-slim
set -eu
base=${1:?usage: base-image.sh debian:SUITE-slim}
docker=${DOCKER:-docker}

if $docker image inspect "$base" >/dev/null 2>&1; then
    exit 0
fi
if $docker pull "$base" >/dev/null 2>&1; then
    echo "base-image: pulled $base"
    exit 0
fi
case $base in
    debian:*-slim) suite=${base#debian:}; suite=${suite%-slim} ;;
    *) echo "base-image: cannot pull $base and can only build debian:SUITE-slim from packages" >&2; exit 2 ;;
esac
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
# The Debian mirror this host already uses (apt's deb822 or one-line sources), so no host name lives in the repo.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "base-image: no Debian mirror found in /etc/apt/sources.list*" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base-image: $base cannot be pulled; building it with debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
# As the slim images do: no apt lists, caches or docs in the base layer.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" --numeric-owner -c . | $docker import --change 'CMD ["bash"]' - "$base" >/dev/null
echo "base-image: imported $base ($($docker image inspect --format '{{.Size}}' "$base") bytes)"
