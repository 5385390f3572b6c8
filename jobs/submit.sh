#!/usr/bin/env bash
# Submit an xfer job to a Ray cluster (Ray 2.60, dashboard token auth):
#
#   export RAY_ADDRESS=http://127.0.0.1:8265      # the head's dashboard
#   export RAY_AUTH_TOKEN=...                     # or keep it in ~/.ray/auth_token
#   jobs/submit.sh train --config jobs/configs/gpu_production.yaml [key=value ...]
#   jobs/submit.sh score --config jobs/configs/nightly_score.yaml storage.root=s3://<bucket>
#   jobs/submit.sh shard s3://bucket/raw/pets s3://bucket/datasets/pets --max-side 256
#
# XFER_RUNTIME_ENV overrides the runtime env file (default jobs/runtime_env.yaml);
# XFER_SUBMIT_ARGS adds options to `ray job submit` (e.g. --no-wait).
# RAY_JOB_SUBMISSION_ID names the job (default: <UTC time>-<6 hex>, the form of xfer's
# run ids; a training run submitted here takes its submission id as its run id).
#
# Exit status: the job's, as far as it is followed: 0 it SUCCEEDED; 1 it FAILED or
# was STOPPED (`ray job stop`); 2 wrong usage; with --no-wait, 0 once it is submitted.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:?usage: jobs/submit.sh train|score|shard [args...]}"
shift
case "$job" in train|score|shard) ;; *) echo "unknown job '$job' (train, score or shard)" >&2; exit 2 ;; esac
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE=token
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$token_file" ]]; then
  echo "no Ray auth token: set RAY_AUTH_TOKEN or put it in $token_file (ray get-auth-token)" >&2
  exit 2
fi
id=${RAY_JOB_SUBMISSION_ID:-$(date -u +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
# shellcheck disable=SC2086  # XFER_SUBMIT_ARGS is a list of options on purpose
ray job submit --address "$RAY_ADDRESS" --submission-id "$id" --working-dir . \
  --runtime-env "${XFER_RUNTIME_ENV:-jobs/runtime_env.yaml}" ${XFER_SUBMIT_ARGS:-} \
  -- python "jobs/$job.py" "$@" && status=0 || status=$?
# `ray job submit` exits 1 for a FAILED job but 0 for a STOPPED one: ask which.
if ((status == 0)) && ray job status --address "$RAY_ADDRESS" "$id" 2>&1 | grep -q "was stopped"; then
  echo "job $id was stopped" >&2
  status=1
fi
exit "$status"
