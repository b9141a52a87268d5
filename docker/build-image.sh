#!/bin/sh
# `make image`: build the one image here or anywhere, then print its size.
#   IMAGE=name:tag IMAGE_CA_BUNDLE=/path/ca.crt docker/build-image.sh
set -eu
image=${IMAGE:?set IMAGE}
here=$(dirname "$0")
# The base is whatever the Dockerfile's stages start FROM (one name for both).
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$here/../Dockerfile" | sort -u)
[ "$(echo "$base" | wc -l)" = 1 ] || { echo "image: the Dockerfile's stages must share one base, found: $base" >&2; exit 2; }
sh "$here/engine.sh"
sh "$here/base-image.sh" "$base"
# BuildKit (for the CA secret) through a client that has it: buildx, or the engine package's own client.
cli=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
    cli=/usr/bin/docker
fi
set -- -t "$image"
if [ -n "${IMAGE_CA_BUNDLE:-}" ]; then
    [ -s "$IMAGE_CA_BUNDLE" ] || { echo "image: IMAGE_CA_BUNDLE=$IMAGE_CA_BUNDLE is not a readable file" >&2; exit 2; }
    set -- "$@" --secret "id=ca,src=$IMAGE_CA_BUNDLE"
fi
started=$(date +%s)
DOCKER_BUILDKIT=1 $cli build "$@" "$here/.."
echo "image: built $image in $(( $(date +%s) - started )) s, $(docker image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
