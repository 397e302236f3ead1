#!/usr/bin/env bash
# Quick start on one machine: sets up and runs Vigil on the embedded default (one node, local
# audit log) in front of a throwaway PostgreSQL, with a development OpenID provider, and prints
# a psql command that connects through the gateway as an AI agent would: the password is an
# OIDC access token from the client-credentials grant. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

deploy/dev/setup.sh
deploy/dev/servers.sh start
# shellcheck disable=SC1091
. "${VIGIL_DEV_DIR:-/tmp/vigil-dev}/env"

echo "quickstart: building vigil (release)…"
cargo build --release -p vigil-node -p vigil-cli -p vigil-coordinator-server --bins
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

DIR="${VIGIL_QUICKSTART_DIR:-/tmp/vigil-quickstart}"
PG_LISTEN="${VIGIL_QUICKSTART_PORT:-6432}"
ADMIN_LISTEN="${VIGIL_QUICKSTART_ADMIN_PORT:-9187}"
mkdir -p "$DIR"
umask 077
printf '%s\n' "$VIGIL_PG_GATEWAY_PASSWORD" > "$DIR/target-password"
cat > "$DIR/vigil-node.toml" <<TOML
# Written by deploy/quickstart.sh; see deploy/vigil-node.toml for every key.
[node]
id = "quickstart-1"
data_dir = "$DIR/data"

[admin]
listen = "127.0.0.1:$ADMIN_LISTEN"

[identity]
issuer = "$VIGIL_OIDC_ISSUER"
audiences = ["$VIGIL_OIDC_AUDIENCE", "vigil-cli"]

# The embedded coordinator takes alice's vigil-cli ID token from approvers, never an agent's.
[coordinator]
operator_audiences = ["vigil-cli"]

[postgres]
listen = "127.0.0.1:$PG_LISTEN"

[[postgres.connections]]
name = "app"
host = "$VIGIL_PG_HOST"
port = $VIGIL_PG_PORT
database = "app"
user = "$VIGIL_PG_GATEWAY_USER"
password = { file = "$DIR/target-password" }
allow = { client_ids = ["agent-reporting", "agent-ops"], groups = ["dba"] }

[[postgres.connections]]
name = "bench"
host = "$VIGIL_PG_HOST"
port = $VIGIL_PG_PORT
database = "bench"
user = "$VIGIL_PG_GATEWAY_USER"
password = { file = "$DIR/target-password" }
allow = { any_authenticated = true }

# Guardrails and masking (docs/policy.md): destructive statements are refused on "app", and
# e-mail addresses never reach the audit log in clear.
[[policy.rules]]
id = "no-destruction"
action = "block"
connections = ["app"]
flags = ["drop", "truncate", "delete_without_where", "update_without_where"]
reason = "destructive statements need a human"

# Agents' writes on "app" are held until a member of "approvers" approves them
# (vigil approvals …); the embedded coordinator holds the requests.
[[policy.rules]]
id = "writes-need-approval"
action = "require_approval"
connections = ["app"]
kinds = ["write"]
reason = "agents' writes need an approver"
approval = { approvers = "approvers", wait_secs = 60 }

[[policy.masking.detectors]]
kind = "email"
method = "keep_last"
keep = 4
TOML

"$BIN/vigil-node" --config "$DIR/vigil-node.toml" > "$DIR/vigil-node.log" 2>&1 &
NODE_PID=$!
stop() {
  kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null || true
  "$ROOT/deploy/dev/servers.sh" stop || true
}
trap stop EXIT
trap 'exit 0' INT TERM
for _ in $(seq 1 100); do
  if curl -fs "http://127.0.0.1:$ADMIN_LISTEN/readyz" > /dev/null 2>&1; then break; fi
  if ! kill -0 "$NODE_PID" 2>/dev/null; then cat "$DIR/vigil-node.log"; exit 1; fi
  sleep 0.1
done
curl -fs "http://127.0.0.1:$ADMIN_LISTEN/readyz" > /dev/null || { cat "$DIR/vigil-node.log"; exit 1; }

TOKEN_CMD="$VIGIL_NODE $VIGIL_OIDC_DIR/token.mjs --issuer $VIGIL_OIDC_ISSUER --client agent-reporting --secret agent-reporting-secret"
TOKEN=$($TOKEN_CMD)
cat <<MSG

Vigil is running: PostgreSQL gateway on 127.0.0.1:$PG_LISTEN, admin on 127.0.0.1:$ADMIN_LISTEN,
audit log in $DIR/data/audit. Connect as the agent "agent-reporting" (model gpt-5), whose
password is an OIDC access token (valid 10 minutes; the session ends when the token expires, so
reconnect with a new one):

  PGPASSWORD='$TOKEN' PGSSLMODE=require PGAPPNAME=my-intent \\
    psql -h 127.0.0.1 -p $PG_LISTEN -U agent app

  (new token: $TOKEN_CMD)

Try "DELETE FROM customers" (refused by the guardrail) and "SELECT * FROM customers" (the
e-mail addresses are masked in the audit copy). Try "UPDATE customers SET name = 'renamed'
WHERE id = 1": it is held for approval (up to 60 s). Approve it as the person "alice" (group
approvers) from another shell:

  ALICE=\$($VIGIL_NODE $VIGIL_OIDC_DIR/id-token.mjs --issuer $VIGIL_OIDC_ISSUER --user alice)
  $BIN/vigil approvals list --token "\$ALICE"
  $BIN/vigil approvals approve apr-… --token "\$ALICE" --comment "ticket 42"

Then, in another shell:

  $BIN/vigil audit verify --config $DIR/vigil-node.toml
  $BIN/vigil sessions --config $DIR/vigil-node.toml
  $BIN/vigil replay SESSION_ID --config $DIR/vigil-node.toml

Node log: $DIR/vigil-node.log. Ctrl-C stops Vigil and the dev servers.
MSG
wait "$NODE_PID"
