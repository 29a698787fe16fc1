#!/usr/bin/env bash
# Builds the container images on a machine without a container registry: FROM scratch plus
# statically linked binaries (the Rust binaries linked with +crt-static, Debian's busybox-static).
#
#   deploy/build-images.sh [IMAGE...]     IMAGE: agent-base, control-plane, busybox-plain
#                                         (default: all three)
#
# Images: codebolt/agent-base:latest, codebolt/control-plane:latest, codebolt/busybox-plain:latest.
# Static binaries go to target/x86_64-unknown-linux-gnu/release/ (the host build is untouched).
# Environment: BUSYBOX (default /bin/busybox), DOCKER (default docker).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BUSYBOX=${BUSYBOX:-/bin/busybox}
TARGET=x86_64-unknown-linux-gnu
OUT=target/$TARGET/release
IMAGES=("$@")
[ ${#IMAGES[@]} -eq 0 ] && IMAGES=(agent-base control-plane busybox-plain)

die() { echo "build-images: $*" >&2; exit 1; }

"$DOCKER" info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"

packages=()
for image in "${IMAGES[@]}"; do
  case "$image" in
    agent-base) packages+=(-p agent-shim) ;;
    control-plane) packages+=(-p agent-shim -p codebolt-control-plane) ;;
    busybox-plain) ;;
    *) die "unknown image '$image' (expected agent-base, control-plane or busybox-plain)" ;;
  esac
done
needs_busybox=0
for image in "${IMAGES[@]}"; do
  [ "$image" != control-plane ] && needs_busybox=1
done
if [ $needs_busybox = 1 ]; then
  [ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install busybox-static (apt-get install busybox-static)"
  file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
    || ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic executable' \
    || die "$BUSYBOX is not statically linked: install busybox-static"
fi

if [ ${#packages[@]} -gt 0 ]; then
  # A target given explicitly keeps these flags off build scripts and off the host build.
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$TARGET" "${packages[@]}"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

for image in "${IMAGES[@]}"; do
  dir="$context/$image"
  mkdir -p "$dir"
  cp deploy/"$image"/Dockerfile "$dir/"
  case "$image" in
    agent-base)
      cp "$BUSYBOX" "$dir/busybox"
      cp "$OUT/agent-shim" "$dir/"
      cp deploy/passwd deploy/group "$dir/"
      ;;
    control-plane)
      cp "$OUT/codebolt" "$OUT/agent-shim" "$dir/"
      cp deploy/passwd deploy/group "$dir/"
      mkdir -p "$dir/tmp" && chmod 1777 "$dir/tmp"
      ;;
    busybox-plain)
      cp "$BUSYBOX" "$dir/busybox"
      ;;
  esac
  echo "build-images: building codebolt/$image:latest"
  DOCKER_BUILDKIT=0 "$DOCKER" build -q -t "codebolt/$image:latest" "$dir" >/dev/null
  echo "build-images: codebolt/$image:latest built"
done
