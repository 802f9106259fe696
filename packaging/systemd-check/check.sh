#!/bin/sh
# Inside the booted container (a oneshot unit after gpumesh.service): use the service the
# way an operator would, stop it with a request in flight and an engine running, and write
# /results/report.txt (one "name: value" per line, "verdict: ok" last when all held).
set -u
G=/opt/gpumesh/venv/bin/gpumesh
PY=/opt/gpumesh/venv/bin/python
R=/results/report.txt
: > "$R"
ok=yes
say() { echo "$*" >> "$R"; }
check() { say "$1: $2"; [ "$2" = "$3" ] || { ok=no; say "  expected: $3"; }; }
export GPUMESH_DATA_DIR=/var/lib/gpumesh

i=0; until $G status --json > /results/status.json 2>/results/status.err; do
  i=$((i + 1)); [ $i -gt 240 ] && break; sleep 0.5; done
check "service active" "$(systemctl is-active gpumesh)" active
check "CLI finds the node through the data dir" \
  "$($PY -c 'import json; print(json.load(open("/results/status.json"))["raft"]["is_leader"])')" True
pid=$(systemctl show -p MainPID --value gpumesh)
say "daemon user: $(ps -o user= -p "$pid") (DynamicUser)"
check "doctor" "$($G doctor --json > /results/doctor.json 2>&1; echo $?)" 0

$G deploy /srv/models/tiny.gguf --wait --timeout 180 > /results/deploy.txt 2>&1
check "deploy --wait" "$?" 0
engines=$(pgrep -f llama_cpp_runner | tr '\n' ' ')
say "engine pids: $engines"

# A request in flight: a body announced and never sent.
$PY - > /results/stalled.txt 2>&1 <<'PY' &
import json, socket, time
key = open("/var/lib/gpumesh/admin.key").read().strip()
url = json.load(open("/var/lib/gpumesh/endpoint.json"))["connect_url"]
host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
s.sendall(b"POST /api/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
          + b"\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{")
start = time.monotonic()
print("cut after", round(time.monotonic() - start if s.recv(1) == b"" else -1, 1), "s")
PY
sleep 1
start=$(date +%s%N)
systemctl stop gpumesh
took=$(( ($(date +%s%N) - start) / 1000000 ))
say "stop took: ${took} ms (TimeoutStopSec: $(systemctl show -p TimeoutStopUSec --value gpumesh))"
[ "$took" -lt 45000 ] || ok=no
check "stop result" "$(systemctl show -p Result --value gpumesh)" success
check "daemon exit status" "$(systemctl show -p ExecMainStatus --value gpumesh)" 0
check "engines left" "$(pgrep -f llama_cpp_runner | wc -l)" 0
wait
say "stalled request: $(cat /results/stalled.txt)"

systemctl start gpumesh
i=0; until $G models --json > /results/models.json 2>/dev/null; do
  i=$((i + 1)); [ $i -gt 240 ] && break; sleep 0.5; done
$G show tiny --json > /results/tiny.json 2>&1
i=0; until $PY -c 'import json,sys; sys.exit(json.load(open("/results/tiny.json"))["status"] != "running")'; do
  i=$((i + 1)); [ $i -gt 240 ] && break; sleep 0.5; $G show tiny --json > /results/tiny.json 2>&1; done
check "after a restart the model runs again" \
  "$($PY -c 'import json; print(json.load(open("/results/tiny.json"))["status"])')" running
systemctl stop gpumesh
journalctl -u gpumesh --no-pager > /results/journal.txt
say "verdict: $([ $ok = yes ] && echo ok || echo FAILED)"
