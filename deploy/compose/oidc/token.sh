#!/usr/bin/env bash
# Prints an access token of one of the dev provider's agents (client-credentials grant):
#   docker-compose exec -T oidc token agent-reporting     (or agent-ops, agent-denied)
# The dev clients' secrets are their ids with "-secret" appended; give another as $2.
set -euo pipefail
client="${1:?usage: token CLIENT_ID [SECRET]}"
exec node /app/token.mjs --issuer "${OIDC_ISSUER:-http://oidc:8080}" --client "$client" --secret "${2:-$client-secret}"
