#!/bin/sh
# The images' entry point.
#   serve (the default, and the argument SageMaker passes): `flywheel serve` of the project in
#         $FLYWHEEL_CONFIG on 0.0.0.0, port $AIP_HTTP_PORT (Vertex AI), else $PORT, else 8080;
#   health: exit 0 when the server here answers /ready (the image's HEALTHCHECK);
#   anything else: a flywheel command (run --no-serve, monitor, status --json, ...).
set -eu
port="${AIP_HTTP_PORT:-${PORT:-8080}}"
case "${1:-serve}" in
  serve)
    [ "$#" -gt 0 ] && shift
    if [ ! -f "$FLYWHEEL_CONFIG" ]; then
      echo "no flywheel.yaml at $FLYWHEEL_CONFIG: mount one there, bake one in (flywheel image build --config), or set FLYWHEEL_CONFIG" >&2
      exit 2
    fi
    exec flywheel serve --config "$FLYWHEEL_CONFIG" --host 0.0.0.0 --port "$port" "$@"
    ;;
  health)
    exec python -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=2); sys.exit(0)"
    ;;
  *)
    exec flywheel "$@"
    ;;
esac
