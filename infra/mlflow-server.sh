#!/usr/bin/env bash
# Start an MLflow tracking server for latentzoo runs on several machines (a Ray cluster's nodes all log to it:
# set MLFLOW_TRACKING_URI=http://<host>:<port> for the jobs). The store lives in the current directory unless
# BACKEND_STORE_URI / ARTIFACTS_DESTINATION say otherwise; start it in a directory of its own (a project's
# mlflow.db holds experiments whose artifacts point at local file paths other nodes cannot reach).
#
#   infra/mlflow-server.sh                                # http://127.0.0.1:5000, this machine only
#   HOST=0.0.0.0 infra/mlflow-server.sh                   # other machines too: read the warning below first
#   BACKEND_STORE_URI=postgresql://user:pass@db:5432/mlflow ARTIFACTS_DESTINATION=s3://bucket/mlflow \
#       HOST=0.0.0.0 infra/mlflow-server.sh              # team server: PostgreSQL (psycopg2) + S3 (boto3)
#
# Environment:
#   HOST                   interface to bind (default 127.0.0.1: loopback only)
#   PORT                   default 5000
#   BACKEND_STORE_URI      runs, params, metrics, registry (default sqlite:///mlflow.db; PostgreSQL for a team)
#   ARTIFACTS_DESTINATION  where the server keeps artifacts (default ./mlartifacts): clients upload and download
#                          through the server (--serve-artifacts), so only this machine needs the path; or a
#                          shared path, or s3://bucket/prefix (AWS_* credentials, MLFLOW_S3_ENDPOINT_URL for MinIO
#                          or another S3-compatible store)
#   ALLOWED_HOSTS          Host headers to answer (--allowed-hosts; default: localhost and private IPs), e.g.
#                          mlflow.example.org when clients reach it by a DNS name
#   APP_NAME               basic-auth: MLflow's built-in users and passwords (--app-name basic-auth)
#   WORKERS                server processes (default 2)
# Extra arguments are passed to `mlflow server`.
#
# WARNING: HOST=0.0.0.0 exposes the server to every network this machine is on, and MLflow has no
# authentication by default: anyone who reaches the port can read, change and delete runs and models. Keep it
# on a private network (security group / firewall limited to the cluster), and put authentication in front:
# APP_NAME=basic-auth (MLFLOW_AUTH_CONFIG_PATH for its config, the admin password changed at once; clients set
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), or bind 127.0.0.1 behind a reverse proxy (nginx,
# Caddy, oauth2-proxy) that does TLS and authentication.
set -euo pipefail

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-./mlartifacts}"
WORKERS="${WORKERS:-2}"

# The repo's .venv (what `make install` builds) when there is one, else mlflow from PATH.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mlflow="$repo/.venv/bin/mlflow"
[[ -x "$mlflow" ]] || mlflow="$(command -v mlflow)" || { echo "mlflow-server.sh: mlflow not found" >&2; exit 1; }

args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --backend-store-uri "$BACKEND_STORE_URI" --serve-artifacts --artifacts-destination "$ARTIFACTS_DESTINATION")
[[ -n "${ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
[[ -n "${APP_NAME:-}" ]] && args+=(--app-name "$APP_NAME")
if [[ "$HOST" != 127.0.0.1 && "$HOST" != localhost && -z "${APP_NAME:-}" ]]; then
  echo "mlflow-server.sh: WARNING: binding $HOST without authentication; see the header of $0" >&2
fi

echo "mlflow-server.sh: listening on $HOST:$PORT, store $BACKEND_STORE_URI, artifacts $ARTIFACTS_DESTINATION" >&2
exec "$mlflow" "${args[@]}" "$@"
