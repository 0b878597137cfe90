#!/bin/bash
# Usage: tests/ansible/check.sh MACHINE_NAME [EXPECTED_STORAGE_DRIVER [EXPECTED_BRIDGE_GATEWAY]]
#
# Checks a machine provisioned by tests/ansible/run.sh from the outside, with the docker CLI as client:
# the engine answers over mutual TLS on 2376 with the expected storage driver, runs a FROM-scratch busybox
# image, refuses a client without a certificate and plain HTTP, and nothing listens on 2375.
set -eu
name=$1
driver=${2:-}
gateway=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
pymachine=${PYMACHINE:-$repo/.venv/bin/pymachine}
work=${PM_ANSIBLE_WORK:-/var/tmp/pymachine-ansible}/$name
# The machine's address: from pymachine, or straight from its config.json.
ip=$("$pymachine" ip "$name" 2>/dev/null) || ip=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["resources"]["ip"])' \
    "${PYMACHINE_HOME:-$HOME/.pymachine}/machines/$name/config.json")
busybox=${BUSYBOX:-/bin/busybox}
fail() { echo "FAIL: $*" >&2; exit 1; }
export DOCKER_CONFIG="$work/docker-config"   # no stray client configuration
mkdir -p "$DOCKER_CONFIG"
d() { docker --tlsverify --tlscacert "$work/ca.pem" --tlscert "$work/cert.pem" --tlskey "$work/key.pem" \
             -H "tcp://$ip:2376" "$@"; }

got=$(d info --format '{{.Driver}}')
echo "ok: engine answers over mutual TLS on $ip:2376, storage driver $got"
[ -z "$driver" ] || [ "$got" = "$driver" ] || fail "storage driver is $got, expected $driver"

if [ -n "$gateway" ]; then
    gw=$(d network inspect bridge --format '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
    [ "$gw" = "$gateway" ] || fail "bridge gateway is $gw, expected $gateway"
    echo "ok: default bridge gateway $gw"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin"
cp "$busybox" "$ctx/bin/busybox"
printf 'FROM scratch\nCOPY bin/busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\n' > "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 d build -q -t pymachine-busybox:test "$ctx" >/dev/null 2>"$ctx/build.err" \
    || { cat "$ctx/build.err" >&2; fail "docker build"; }
out=$(d run --rm pymachine-busybox:test echo hello-from-busybox)
[ "$out" = "hello-from-busybox" ] || fail "docker run printed '$out'"
echo "ok: docker run of a FROM-scratch busybox image printed: $out"
out=$(d run --rm pymachine-busybox:test sh -c 'ip -4 -o addr show eth0 | cut -d" " -f7 ; ip route | head -1')
echo "ok: container network: $(echo $out)"

if docker --tls --tlscacert "$work/ca.pem" -H "tcp://$ip:2376" version >"$ctx/nocert" 2>&1; then
    fail "a client without a certificate was served"
fi
echo "ok: client without a certificate refused: $(grep -o 'tls: [a-z ]*' "$ctx/nocert" | head -1)"
if curl -s -m 5 "http://$ip:2376/version" | grep -q ApiVersion; then fail "plain HTTP served on 2376"; fi
echo "ok: plain HTTP on 2376 not served"
if timeout 3 bash -c "exec 3<>/dev/tcp/$ip/2375" 2>/dev/null; then fail "port 2375 is open"; fi
echo "ok: port 2375 closed"
d rmi -f pymachine-busybox:test >/dev/null
echo "all checks passed"
