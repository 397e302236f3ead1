#!/usr/bin/env bash
# Generates the provider's RSA signing key on first start (kept in the container, so a restart
# keeps it), then runs deploy/dev/oidc/server.mjs on 0.0.0.0:8080 with the issuer
# $OIDC_ISSUER (default http://oidc:8080: what gateways and coordinators reach it as).
set -euo pipefail
key=/tmp/oidc/signing-key.pem
if [[ ! -s "$key" ]]; then
  mkdir -p -m 700 /tmp/oidc
  node -e '
    const c = require("node:crypto");
    const { privateKey } = c.generateKeyPairSync("rsa", { modulusLength: 2048 });
    require("node:fs").writeFileSync(process.argv[1], privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600 });
  ' "$key"
fi
export OIDC_ISSUER="${OIDC_ISSUER:-http://oidc:8080}"
exec node /app/server.mjs --host 0.0.0.0 --port 8080 --key "$key" --kid "${OIDC_KID:-compose-key-1}"
