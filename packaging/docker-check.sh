#!/usr/bin/env bash
# Build packaging/Dockerfile and exercise the image: start a node, deploy a tiny model, chat
# through the gateway, stop it within the stop timeout. Needs a docker daemon (DOCKER_HOST)
# and a built wheel in dist/:
#   python -m build --wheel && packaging/docker-check.sh [BASE_IMAGE]
# BASE_IMAGE replaces python:3.12-slim-bookworm where no registry is reachable.
# The node runs with --network host on kernel-chosen loopback ports, mDNS off.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
base=${1:-python:3.12-slim-bookworm}
work=$(mktemp -d /var/tmp/gpumesh-docker-check.XXXXXX)
name=gpumesh-check-$$
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; docker volume rm "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
say() { echo "$*" | tee -a "$work/report.txt"; }

docker build -q --network host --build-arg "BASE=$base" -f "$repo/packaging/Dockerfile" \
  -t gpumesh:check "$repo" > "$work/build.txt"
say "image: $(docker image inspect gpumesh:check --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

"$repo/.venv/bin/python" -c "import sys; sys.path.insert(0, '$repo/tests'); \
  from tinymodels import write_tiny_gguf; write_tiny_gguf(__import__('pathlib').Path('$work/tiny.gguf'))"
chmod -R a+rX "$work"
read -r api raft <<< "$("$repo/.venv/bin/python" -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')"
started=$(date +%s%N)
docker run -d --name "$name" --network host --stop-timeout 45 -v "$name:/var/lib/gpumesh" \
  -v "$work/tiny.gguf:/models/tiny.gguf:ro" -e GPUMESH_HOST=127.0.0.1 \
  -e GPUMESH_API_PORT="$api" -e GPUMESH_RAFT_PORT="$raft" -e GPUMESH_DISCOVERY=off \
  gpumesh:check > /dev/null
for _ in $(seq 120); do docker exec "$name" gpumesh status --json > "$work/status.json" 2>/dev/null && break; sleep 0.5; done
say "up and answering after: $(( ($(date +%s%N) - started) / 1000000 )) ms"
say "user: $(docker exec "$name" id -un)"
mapfile -t probe < <(docker image inspect gpumesh:check --format '{{range $i, $a := .Config.Healthcheck.Test}}{{if $i}}{{println $a}}{{end}}{{end}}')
docker exec "$name" "${probe[@]}" && say "HEALTHCHECK command: passes" || say "HEALTHCHECK command: FAILS"
docker exec "$name" gpumesh doctor --json > "$work/doctor.json" && say "doctor: ok" || say "doctor: PROBLEMS"
docker exec "$name" gpumesh deploy /models/tiny.gguf --wait --timeout 120 > "$work/deploy.txt"
say "deploy: $(cat "$work/deploy.txt")"
key=$(docker exec "$name" cat /var/lib/gpumesh/admin.key)
curl -sf "http://127.0.0.1:$api/v1/chat/completions" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}' \
  > "$work/chat.json" && say "chat: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["object"], r["usage"])' "$work/chat.json")"
stop_start=$(date +%s%N)
docker stop "$name" > /dev/null
say "docker stop took: $(( ($(date +%s%N) - stop_start) / 1000000 )) ms, exit code $(docker inspect "$name" --format '{{.State.ExitCode}}')"
docker logs "$name" > "$work/logs.txt" 2>&1
docker start "$name" > /dev/null
for _ in $(seq 120); do docker exec "$name" gpumesh show tiny --json > "$work/tiny.json" 2>/dev/null \
  && grep -q '"status": "running"' "$work/tiny.json" && break; sleep 0.5; done
say "after a restart on the same volume: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$work/tiny.json")"
echo "details in $work"
