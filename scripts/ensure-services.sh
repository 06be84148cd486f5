#!/usr/bin/env bash
# Start PostgreSQL on 127.0.0.1:5432 if it is not up (the tests of the production path need it),
# and install Debian's PostgreSQL JDBC driver when it is missing (Spark reads the source over JDBC
# with it in the Spark tests; a new machine does not have it).
set -euo pipefail
if [ ! -f /usr/share/java/postgresql.jar ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing libpostgresql-jdbc-java from Debian's packages" >&2
  if ! apt-get install -y -qq libpostgresql-jdbc-java >/dev/null; then
    apt-get update -qq >/dev/null  # a new machine's package lists may be missing or stale
    apt-get install -y -qq libpostgresql-jdbc-java >/dev/null
  fi
fi
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  exit 0
fi
echo "PostgreSQL is not answering on 127.0.0.1:5432; starting it" >&2
if command -v pg_ctlcluster >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
else
  echo "pg_ctlcluster not found: start PostgreSQL on 127.0.0.1:5432 yourself" >&2
  exit 1
fi
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 -q && exit 0
  sleep 1
done
echo "PostgreSQL did not come up on 127.0.0.1:5432 within 30 s" >&2
exit 1
