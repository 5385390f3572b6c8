#!/usr/bin/env bash
# Submit a Ray job once, follow it, and exit with how it ended. The command of the
# submitter pod of every xfer RayJob (k8s/), and usable anywhere else, e.g. from the
# repository root against a local head:
#
#   RAY_DASHBOARD_ADDRESS=127.0.0.1:8265 RAY_JOB_SUBMISSION_ID=train-20261127 \
#   RAY_AUTH_TOKEN=... XFER_SUBMIT_ARGS="--working-dir . --runtime-env jobs/runtime_env.yaml" \
#       jobs/kuberay_submit.sh python jobs/train.py --config jobs/configs/local.yaml
#
# Usage: jobs/kuberay_submit.sh ENTRYPOINT [ARG ...]
#        jobs/kuberay_submit.sh --help
#   ENTRYPOINT [ARG ...]   what the head runs, one word per argument, as after
#                          `ray job submit --` (the RayJob's spec.entrypoint, split)
#   RAY_DASHBOARD_ADDRESS  the Ray dashboard, host:port (http:// is added) or a URL
#   RAY_JOB_SUBMISSION_ID  the job's submission id: the same id on every retry
#   RAY_AUTH_TOKEN         the dashboard token (RAY_AUTH_MODE=token is then implied)
#   XFER_SUBMIT_ARGS       more `ray job submit` options, e.g. a working dir and runtime
#                          env (on KubeRay none: the code is in the image, /opt/xfer)
#   KUBERAY_SUBMIT_WAIT_SECONDS  how long to wait for the dashboard (default 600)
# KubeRay sets RAY_DASHBOARD_ADDRESS (status.dashboardURL), RAY_JOB_SUBMISSION_ID
# (status.jobId) and, with authOptions.mode token, RAY_AUTH_MODE and RAY_AUTH_TOKEN in
# the submitter container. Needs `ray` and `python3` with Ray on PATH (the job image;
# locally, PATH=.venv/bin:$PATH).
#
# Steps: wait until the dashboard answers; if a job with that submission id exists,
# say so and do not submit again, else `ray job submit --no-wait --submission-id`;
# follow its logs; wait until it has ended. A retried submitter pod therefore neither
# starts a second run ("submission ID exists", ray-project/kuberay#2317) nor reports
# success for a failed one (a retry following a failed job's logs exits 0,
# ray-project/kuberay#3211).
#
# Exit status: 0 the job SUCCEEDED; 1 it FAILED or was STOPPED; 2 wrong usage; 3 the
# dashboard was not reached, refused the token or the submission, or was lost before
# the job ended (how the job ends is then unknown here).
set -euo pipefail

say() { echo "[kuberay_submit] $*"; }
die() {
  local code=$1
  shift
  echo "[kuberay_submit] error: $*" >&2
  exit "$code"
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then # this header, up to `set -euo pipefail`
  sed -n '2,/^set -euo pipefail/{/^set /d;s/^# \{0,1\}//;p}' "$0"
  exit 0
fi
[[ -n "${RAY_DASHBOARD_ADDRESS:-}" ]] || die 2 "RAY_DASHBOARD_ADDRESS is not set (the Ray dashboard, host:port)"
[[ -n "${RAY_JOB_SUBMISSION_ID:-}" ]] || die 2 "RAY_JOB_SUBMISSION_ID is not set"
(($# > 0)) || die 2 "no entrypoint; usage: $0 ENTRYPOINT [ARG ...]"
address=$RAY_DASHBOARD_ADDRESS
[[ $address == *://* ]] || address="http://$address"
id=$RAY_JOB_SUBMISSION_ID
if [[ -n "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_MODE:-}" ]]; then
  export RAY_AUTH_MODE=token
fi
wait_seconds=${KUBERAY_SUBMIT_WAIT_SECONDS:-600}
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT

# Prints the job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED), or NONE when
# no job has this submission id, through Ray's job SDK (what `ray job status` prints for
# people). Fails when the dashboard cannot be asked, with status 4 when it refused the
# request (a wrong or missing token); the error is in $errors.
job_status() {
  python3 - "$address" "$id" 2>"$errors" <<'PY' | tail -n 1
import sys

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

address, job_id = sys.argv[1:]
try:
    print(JobSubmissionClient(address).get_job_status(job_id).value)
except AuthenticationError as e:  # a wrong or missing token
    print(e, file=sys.stderr)
    sys.exit(4)
except RuntimeError as e:  # the dashboard answered with an error; 404: no such job
    if "status code 404" not in str(e):
        raise
    print("NONE")
PY
}

deadline=$((SECONDS + wait_seconds))
until status=$(job_status); do
  if (($? == 4)); then
    tail -n 1 "$errors" >&2
    die 3 "the Ray dashboard at $address refused the request: check RAY_AUTH_TOKEN"
  elif ((SECONDS >= deadline)); then
    tail -n 1 "$errors" >&2
    die 3 "no answer from the Ray dashboard at $address within ${wait_seconds}s"
  fi
  say "waiting for the Ray dashboard at $address"
  sleep 5
done

if [[ $status == NONE ]]; then
  say "submitting job $id: $*"
  # shellcheck disable=SC2086  # XFER_SUBMIT_ARGS is a list of options on purpose
  if ! ray job submit --address "$address" --submission-id "$id" --no-wait ${XFER_SUBMIT_ARGS:-} -- "$@"; then
    # The submission may have been accepted although its answer was lost: the id tells.
    status=$(job_status) || {
      tail -n 1 "$errors" >&2
      die 3 "submitting job $id failed, and the dashboard at $address cannot say whether it exists"
    }
    [[ $status != NONE ]] || die 3 "submitting job $id to $address failed"
    say "job $id exists ($status) although its submission reported an error: following it"
  fi
else
  say "job $id was submitted before ($status): not submitting it again, following it"
fi

# Returns when the job ends, or earlier when the stream breaks; the status decides.
ray job logs --address "$address" --follow "$id" ||
  say "the log stream of job $id broke off; waiting for the job to end"

failures=0
while :; do
  if status=$(job_status); then
    failures=0
    case $status in SUCCEEDED | FAILED | STOPPED) break ;; esac
  elif ((++failures >= 60)); then
    tail -n 1 "$errors" >&2
    die 3 "lost the Ray dashboard at $address while job $id was running"
  fi
  sleep 5
done

ray job status --address "$address" "$id" || true
say "job $id: $status"
[[ $status == SUCCEEDED ]] || exit 1
