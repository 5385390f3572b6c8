#!/usr/bin/env bash
# make image-test: build the job image (infra/Dockerfile) and run a smoke test inside it,
# on a machine that reaches no container registry.
#
#   infra/image-test/run.sh            (from anywhere; `make image-test` runs this)
#
# Steps, each timed:
#   1. wheelhouse  the lock's wheels and xfer's build backend, downloaded on the host
#                  (`pip download`: the host's pip cache and TLS set-up; nothing inside
#                  a build or container reaches the network for Python packages)
#   2. os          a Debian bookworm root made by debootstrap (python3, pip, passwd),
#                  imported as an image: no registry needed
#   3. base        base.Containerfile: that OS plus the lock's TensorFlow wheel, the
#                  stand-in for docker.io/tensorflow/tensorflow:<lock's version>-gpu
#   4. image       infra/Dockerfile itself, unchanged but for its BASE_IMAGE and
#                  WHEELHOUSE build arguments
#   5. smoke       smoke.sh inside the image, as uid 1000, with a read-only root file
#                  system: versions, pip check, the Keras 2 guard, the submitter's
#                  --help, and `xfer demo --quick` end to end (its own S3 server)
#
# Needs podman, runc and debootstrap (Debian: apt-get install podman buildah runc
# debootstrap), root or rootless podman, and the project's virtualenv for pip (.venv,
# made by `make install`; PIP=... picks another). Everything it makes lives in one
# temporary folder (podman's storage included, through --root/--runroot) and is
# removed at the end, also on failure or Ctrl-C; KEEP=1 keeps it for a look.
#
# Host-friendly by construction: builds use the host's network namespace (apt inside
# the Dockerfile's RUN reaches Debian's mirror) and the smoke test runs with
# --network none, so podman never makes a bridge, a firewall rule or turns on IP
# forwarding; containers run with runc (crun refuses hybrid cgroup hosts) and with
# ulimits a sandbox allows (containers.conf below).
#
# Exit status: 0 the image built and every smoke check passed; 1 a step failed (the
# step is named on stderr); 2 a tool is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PIP=${PIP:-$ROOT/.venv/bin/pip}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf '[image-test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
  printf '[image-test] error: %s\n' "$2" >&2
  exit "$1"
}

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || die 2 "$tool not found (Debian: apt-get install podman buildah runc debootstrap)"
done
[[ -x $PIP ]] || die 2 "$PIP not found: run \`make install\` first, or set PIP=/path/to/pip"

TF=$(grep -E '^tensorflow==' "$ROOT/infra/requirements.lock") || die 2 "infra/requirements.lock pins no tensorflow"
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $COMMIT != unknown ]] && [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
  COMMIT="$COMMIT-dirty"
fi
TAG=${COMMIT:0:12}${COMMIT#"${COMMIT%-dirty}"}

# podman keeps some things outside --root: its network config folder (set to WORK in
# containers.conf below) and, for root, /var/lib/containers/cache (a blob-info cache)
# and /run/containers. Those folders are removed at the end if this run made them.
HOST_DIRS=()
for dir in /var/lib/containers /run/containers; do
  [[ -e $dir ]] || HOST_DIRS+=("$dir")
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xfer-image-test.XXXXXX")
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
events_logger = "none"
[network]
network_config_dir = "$WORK/networks"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver "${STORAGE_DRIVER:-overlay}")

cleanup() {
  local status=$?
  set +e
  if ((status != 0)); then
    printf '[image-test] FAILED in step: %s (exit %s)\n' "${STEP:-setup}" "$status" >&2
  fi
  if [[ ${KEEP:-0} == 1 ]]; then
    say "kept $WORK (podman: ${PODMAN[*]})"
    return
  fi
  # Containers run with --rm; what remains is images and layers in the private storage,
  # and the overlay driver's own mount of its folder, which `system reset` undoes.
  "${PODMAN[@]}" rm --all --force >/dev/null 2>&1
  "${PODMAN[@]}" system reset --force >/dev/null 2>&1
  findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r -n 1 umount 2>/dev/null
  rm -rf "$WORK"
  for dir in "${HOST_DIRS[@]}"; do
    rm -rf "$dir"
  done
  if [[ -e $WORK ]]; then
    printf '[image-test] error: could not remove %s\n' "$WORK" >&2
    ((status)) || status=1
  fi
  return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {
  STEP=$1
  STEP_START=$SECONDS
  say "== $1: $2"
}
done_step() { say "   $STEP done in $((SECONDS - STEP_START)) s"; }

# Each step logs to $WORK/<step>.log and shows its tail when it fails.
logged() {
  "$@" >>"$WORK/$STEP.log" 2>&1 || {
    local status=$?
    tail -n 40 "$WORK/$STEP.log" >&2
    return "$status"
  }
}

wheelhouse() {
  step wheelhouse "the lock's wheels and the build backend, from the host ($PIP download)"
  local backend
  backend=$(grep -oE 'setuptools[^"]*' "$ROOT/pyproject.toml" | head -1)
  logged "$PIP" download --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$WORK/wheels" -r "$ROOT/infra/requirements.lock" "$backend" wheel
  say "   $(find "$WORK/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)"
  done_step
}

os_image() {
  step os "debootstrap --variant=minbase $SUITE ($MIRROR), imported as an image"
  logged debootstrap --variant=minbase --include=python3,python3-pip,passwd,ca-certificates \
    "$SUITE" "$WORK/rootfs" "$MIRROR"
  tar -C "$WORK/rootfs" -c . | logged "${PODMAN[@]}" import - "localhost/xfer-image-test-os:$SUITE"
  rm -rf "$WORK/rootfs"
  done_step
}

base_image() {
  step base "base.Containerfile: Debian + $TF from the wheelhouse"
  logged "${PODMAN[@]}" build --network host --volume "$WORK/wheels:/wheels:ro" \
    --build-arg "OS_IMAGE=localhost/xfer-image-test-os:$SUITE" --build-arg "TENSORFLOW=$TF" \
    -f "$ROOT/infra/image-test/base.Containerfile" -t localhost/xfer-image-test-base:latest \
    "$ROOT/infra/image-test"
  done_step
}

job_image() {
  step image "infra/Dockerfile on that base (tag xfer-job:$TAG)"
  logged "${PODMAN[@]}" build --network host --volume "$WORK/wheels:/wheels:ro" \
    --build-arg BASE_IMAGE=localhost/xfer-image-test-base:latest \
    --build-arg WHEELHOUSE=/wheels --build-arg "XFER_GIT_COMMIT=$COMMIT" \
    -f "$ROOT/infra/Dockerfile" -t "localhost/xfer-job:$TAG" "$ROOT"
  SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "localhost/xfer-job:$TAG")
  say "   image size $((SIZE / 1000000)) MB (the GPU base adds CUDA and cuDNN to this)"
  done_step
}

smoke() {
  step smoke "infra/image-test/smoke.sh in the image, uid 1000, read-only root, no network"
  # Printed as it goes: the demo shows its progress.
  "${PODMAN[@]}" run --rm --network none --read-only --shm-size 1g \
    --tmpfs /tmp:rw,exec,size=4g --tmpfs /home/xfer:rw,size=1g,U \
    --env "EXPECT_COMMIT=$COMMIT" "localhost/xfer-job:$TAG" \
    bash /opt/xfer/infra/image-test/smoke.sh
  done_step
}

# One function, read whole before it runs: editing this file meanwhile cannot change
# the run (bash reads a script as it goes).
main() {
  local start=$SECONDS
  wheelhouse
  os_image
  base_image
  job_image
  smoke
  STEP=cleanup
  say "image-test passed in $((SECONDS - start)) s; image xfer-job:$TAG, $((SIZE / 1000000)) MB"
}
main "$@"
exit
