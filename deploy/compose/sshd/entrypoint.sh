#!/usr/bin/env bash
# The stack's SSH host: sshd in the foreground, logging to stderr, with the host key and the
# gateway's public key that deploy/compose/stack.sh made (mounted read-only at
# /run/vigil-sshd: host_ed25519_key, authorized_keys). Keys only; no root login. StrictModes
# off: the mounted files belong to whoever ran stack.sh on the host, not to vigil-ops.
set -euo pipefail
keys=/run/vigil-sshd
for f in host_ed25519_key authorized_keys; do
  [[ -s "$keys/$f" ]] || { echo "vigil-sshd: $keys/$f is missing (deploy/compose/stack.sh up makes it)" >&2; exit 2; }
done
exec /usr/sbin/sshd -D -e \
  -h "$keys/host_ed25519_key" \
  -o AuthorizedKeysFile="$keys/authorized_keys" \
  -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
  -o PermitRootLogin=no -o AllowUsers=vigil-ops -o LogLevel=VERBOSE \
  -o StrictModes=no
