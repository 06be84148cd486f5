#!/usr/bin/env bash
# Write the compose stack's secret files under deploy/secrets/ (never committed): the folder is the
# owner's alone (0700); the files are readable (0644) because compose bind-mounts them as they are
# and the containers run as uid 10001, not as you.
# a random database password and admin token, the URLs built from them, and a Grafana password.
# Existing files are kept, so running it again changes nothing. A source database of your own:
#   SOURCE_URL=postgresql://user:password@host:5432/db scripts/compose-secrets.sh
set -euo pipefail
cd "$(dirname "$0")/../deploy"
mkdir -p secrets
chmod 0700 secrets
write() {  # $1: file, $2: value; an existing file is left as it is
  [ -s "secrets/$1" ] || { printf '%s' "$2" > "secrets/$1"; chmod 0644 "secrets/$1"; }
}
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
write db-password "$(random)"
password=$(cat secrets/db-password)
write state-url "postgresql://flywheel:${password}@postgres:5432/flywheel"
write source-url "${SOURCE_URL:-postgresql://flywheel:${password}@postgres:5432/flywheel}"
write mlflow-backend-uri "postgresql+psycopg://flywheel:${password}@postgres:5432/mlflow"
write admin-token "$(random)"
write grafana-admin-password "$(random)"
echo "secret files in deploy/secrets/: $(ls secrets | tr '\n' ' ')"
