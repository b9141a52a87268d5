#!/bin/sh
# Make sure a container engine answers: use the running one, or install Debian's docker.io (as root) and start
# dockerd in the background. Stop an engine started here with `make engine-stop` (kill of the pid in $ENGINE_PID).
set -eu
pidfile=${ENGINE_PID:-/tmp/investment-risk-dockerd.pid}
if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "engine: no container engine; install docker.io (needs root)" >&2; exit 2; }
    echo "engine: installing Debian's docker.io"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
log=${pidfile%.pid}.log
nohup dockerd >"$log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
done
docker info >/dev/null 2>&1 || { echo "engine: dockerd did not come up; see $log" >&2; exit 1; }
echo "engine: started dockerd (pid $(cat "$pidfile"), log $log); stop it with: make engine-stop"
