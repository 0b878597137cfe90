#!/bin/sh
# Usage: tests/ansible/run.sh MACHINE_NAME [extra ansible-playbook args, e.g. -e engine_install=distro]
#
# Runs tests/ansible/site.yml (roles kernel, storage, tls, engine, bridge) with real ansible-playbook
# against a pymachine machine: writes an inventory from the machine's IP, SSH key and pinned host key,
# and - once per machine, reused by later runs - a throwaway CA, a server certificate (SAN = the machine's
# IP) and a client certificate, passed to the tls role as variables.
#
# Environment: PYMACHINE_HOME (default ~/.pymachine), PYMACHINE (the pymachine command, default the
# repository's .venv/bin/pymachine), ANSIBLE_PLAYBOOK (default /var/tmp/ansible-venv/bin/ansible-playbook),
# PM_ANSIBLE_WORK (where inventories and certificates go, default /var/tmp/pymachine-ansible).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 MACHINE_NAME [ansible-playbook args]" >&2; exit 2; }
name=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
pymachine=${PYMACHINE:-$repo/.venv/bin/pymachine}
machine_dir=${PYMACHINE_HOME:-$HOME/.pymachine}/machines/$name
playbook=${ANSIBLE_PLAYBOOK:-/var/tmp/ansible-venv/bin/ansible-playbook}
work=${PM_ANSIBLE_WORK:-/var/tmp/pymachine-ansible}/$name

[ -f "$machine_dir/id_ed25519" ] || { echo "$0: no machine $name in $machine_dir" >&2; exit 1; }
# The machine's address: from pymachine, or straight from its config.json.
ip=$("$pymachine" ip "$name" 2>/dev/null) || ip=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["resources"]["ip"])' \
    "${PYMACHINE_HOME:-$HOME/.pymachine}/machines/$name/config.json")
mkdir -p "$work"
chmod 700 "$work"

# Throwaway PKI: made once, the server certificate again when the machine's IP changed.
if [ ! -f "$work/ca.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=pymachine test CA" \
        -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=client" -keyout "$work/key.pem" -out "$work/client.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > "$work/client.ext"
    openssl x509 -req -in "$work/client.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -CAcreateserial \
        -days 30 -extfile "$work/client.ext" -out "$work/cert.pem" 2>/dev/null
fi
if [ "$(cat "$work/server-ip" 2>/dev/null)" != "$ip" ]; then
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" \
        -keyout "$work/server-key.pem" -out "$work/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost,DNS:%s\nextendedKeyUsage=serverAuth\n' "$ip" "$name" \
        > "$work/server.ext"
    openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -CAcreateserial \
        -days 30 -extfile "$work/server.ext" -out "$work/server-cert.pem" 2>/dev/null
    echo "$ip" > "$work/server-ip"
fi
chmod 600 "$work"/*key.pem
python3 - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
out = {"tls_ca_cert": (work / "ca.pem").read_text(),
       "tls_server_cert": (work / "server-cert.pem").read_text(),
       "tls_server_key": (work / "server-key.pem").read_text()}
path = work / "tls-vars.json"
path.write_text(json.dumps(out))
path.chmod(0o600)
PY

cat > "$work/inventory.ini" <<INV
[machines]
$name ansible_host=$ip ansible_user=root ansible_ssh_private_key_file=$machine_dir/id_ed25519 ansible_ssh_common_args='-o UserKnownHostsFile=$machine_dir/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes' ansible_python_interpreter=/usr/bin/python3
INV

export ANSIBLE_ROLES_PATH="$repo/roles"
export ANSIBLE_PIPELINING=True
export ANSIBLE_RETRY_FILES_ENABLED=False
export ANSIBLE_LOCAL_TEMP="$work/tmp"
export ANSIBLE_SSH_CONTROL_PATH_DIR="$work/cp"
exec "$playbook" -i "$work/inventory.ini" -e "@$work/tls-vars.json" "$here/site.yml" "$@"
