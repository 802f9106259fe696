#!/usr/bin/env bash
# Test packaging/gpumesh.service under a real systemd (PID 1 in a container), as root:
#   packaging/systemd-check/run.sh dist/gpumesh-*.whl [ROOTFS]
# Makes (or reuses) a Debian rootfs with systemd and Python, installs the wheel into
# /opt/gpumesh/venv there, enables the unit as shipped, boots the container with
# systemd-nspawn (private network: nothing leaves it, mDNS included) and runs check.sh
# inside, which starts, uses and stops the service and writes a report. Needs
# debootstrap and systemd-container (apt-get install debootstrap systemd-container).
set -euo pipefail
wheel=$(realpath "$1")
rootfs=$(realpath -m "${2:-/var/tmp/gpumesh-systemd-rootfs}")
here=$(dirname "$(realpath "$0")")
repo=$(dirname "$(dirname "$here")")
work=$(mktemp -d /var/tmp/gpumesh-systemd-check.XXXXXX)
mkdir -p "$work/results" "$work/models" "$work/dist"
cp "$wheel" "$work/dist/"

if [ ! -x "$rootfs/usr/bin/python3" ]; then
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,iproute2,procps,libgomp1 \
    bookworm "$rootfs" http://deb.debian.org/debian
fi

# Package indexes and CA of this machine, if it has them (a proxy, local wheels).
binds=()
for path in /opt/wheels /opt/pypi /opt/pypi-more; do [ -d "$path" ] && binds+=("--bind-ro=$path"); done
pip_env="PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/host-ca.crt"
[ -d /opt/wheels ] && pip_env="$pip_env PIP_FIND_LINKS=/opt/wheels"
[ -d /opt/pypi ] && pip_env="$pip_env PIP_EXTRA_INDEX_URL='file:///opt/pypi/simple file:///opt/pypi-more/simple'"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
run_in() {   # a command in the rootfs, without booting it
  systemd-nspawn -q --keep-unit --register=no -D "$rootfs" "${binds[@]}" \
    --bind-ro=/etc/ssl/certs/ca-certificates.crt:/host-ca.crt --bind-ro="$work/dist:/dist" \
    /bin/sh -c "$1"
}
run_in "rm -rf /opt/gpumesh/venv && python3 -m venv /opt/gpumesh/venv && \
        env $pip_env /opt/gpumesh/venv/bin/pip install -q /dist/$(basename "$wheel")"

# A first start: no state from an earlier run (DynamicUser keeps it under /var/lib/private).
rm -rf "$rootfs/var/lib/private/gpumesh" "$rootfs/var/lib/gpumesh" "$rootfs/var/cache/private/gpumesh"

# The unit exactly as shipped, enabled the way `systemctl enable` does it.
install -m 0644 "$repo/packaging/gpumesh.service" "$rootfs/etc/systemd/system/gpumesh.service"
mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
ln -sf ../gpumesh.service "$rootfs/etc/systemd/system/multi-user.target.wants/gpumesh.service"
install -m 0755 "$here/check.sh" "$rootfs/usr/local/bin/gpumesh-check"
cat > "$rootfs/etc/systemd/system/gpumesh-check.service" <<UNIT
[Unit]
Description=exercise gpumesh.service, then power off
After=gpumesh.service
[Service]
Type=oneshot
ExecStart=/usr/local/bin/gpumesh-check
ExecStopPost=/bin/systemctl poweroff --no-block
UNIT
ln -sf ../gpumesh-check.service "$rootfs/etc/systemd/system/multi-user.target.wants/gpumesh-check.service"

# A tiny random-weight model, made by the tests' own helper.
"$repo/.venv/bin/python" -c "import sys; sys.path.insert(0, '$repo/tests'); \
  from tinymodels import write_tiny_gguf; write_tiny_gguf(__import__('pathlib').Path('$work/models/tiny.gguf'))"
chmod -R a+rX "$work/models"

timeout 600 systemd-nspawn -q -b --keep-unit --register=no --private-network -D "$rootfs" \
  --bind="$work/results:/results" --bind-ro="$work/models:/srv/models" > "$work/console.log" 2>&1 || true
echo "results in $work/results"
cat "$work/results/report.txt"
grep -q "^verdict: ok$" "$work/results/report.txt"
