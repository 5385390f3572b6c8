#!/usr/bin/env bash
# The smoke test run.sh runs inside the job image: what every KubeRay pod relies on.
# Runs as the image's user (uid 1000) with a read-only root file system and no network;
# /tmp and $HOME are the only writable places. Exits non-zero at the first failed check.
set -euo pipefail

check() { printf '[smoke] %s\n' "$*"; }
fail() {
  printf '[smoke] FAILED: %s\n' "$*" >&2
  exit 1
}

check "runs as $(id -un) (uid $(id -u)), HOME=$HOME"
[[ $(id -u) == 1000 ]] || fail "the image runs as uid $(id -u), not 1000 (pods set runAsUser: 1000)"
[[ -w $HOME ]] || fail "HOME=$HOME is not writable"
if touch /opt/xfer/.written 2>/dev/null; then
  fail "the code tree /opt/xfer is writable by the job's user"
fi
check "the code tree /opt/xfer is read-only to it"

version=$(xfer --version)
check "xfer --version: $version"
if [[ -n ${EXPECT_COMMIT:-} && $version != *"commit ${EXPECT_COMMIT:0:12}"* ]]; then
  fail "xfer --version does not name commit ${EXPECT_COMMIT:0:12} (XFER_GIT_COMMIT)"
fi

python3 -m pip check || fail "pip check: the installed packages do not agree"
check "pip check: no broken requirements"

[[ ${TF_USE_LEGACY_KERAS:-} == 1 ]] || fail "TF_USE_LEGACY_KERAS is '${TF_USE_LEGACY_KERAS:-}', not 1"
# Without importing xfer (which sets it too): what Ray's processes see in a pod.
keras=$(python3 -c 'import tensorflow as tf, tf_keras; print(tf.keras.__name__, tf_keras.__version__)' \
  2>"$HOME/keras.err") || { tail -n 5 "$HOME/keras.err" >&2; fail "importing TensorFlow and tf_keras failed"; }
[[ $keras == tf_keras* && $keras == *" 2."* ]] || fail "tf.keras is '$keras', not tf_keras 2.x"
check "Keras 2 guard: TF_USE_LEGACY_KERAS=1, tf.keras is $keras"

for tool in ray wget; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH (KubeRay runs it in the pods)"
done
check "ray $(ray --version 2>/dev/null | awk '{print $NF}') and wget on PATH"

/opt/xfer/jobs/kuberay_submit.sh --help >"$HOME/submit-help.txt" \
  || fail "jobs/kuberay_submit.sh --help exited $?"
grep -q '^Usage: jobs/kuberay_submit.sh' "$HOME/submit-help.txt" \
  || fail "jobs/kuberay_submit.sh --help printed no usage"
check "jobs/kuberay_submit.sh --help: usage printed"

cd "$HOME"
check "xfer demo --quick (embedded S3 server, synth, shard, train, score), in $HOME"
xfer demo --quick || fail "xfer demo --quick exited $?"
check "all checks passed"
