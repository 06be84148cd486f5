#!/usr/bin/env bash
# What the deployment tests need besides Python: a Docker engine (Debian's dockerd, started here
# when none answers), debootstrap for the local base image, promtool and a Prometheus server, and
# docker-compose to validate the compose file. Installs the Debian packages that are missing.
set -euo pipefail
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
echo "no Docker engine answers: starting dockerd" >&2
nohup dockerd >/var/log/flywheel-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not come up within 60 s; see /var/log/flywheel-dockerd.log" >&2
exit 1
