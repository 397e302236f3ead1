#!/usr/bin/env bash
# The Compose stack (docker-compose.yml next to this script) in one command:
#
#   deploy/compose/stack.sh up [--bins DIR]   build what is missing, start, wait, print commands
#   deploy/compose/stack.sh down              stop; remove containers, networks and volumes
#   deploy/compose/stack.sh build [--bins DIR]
#   deploy/compose/stack.sh token CLIENT      an agent's access token from the stack's provider
#   deploy/compose/stack.sh vigil ARGS…       the vigil CLI against the stack's coordinator,
#                                             as the person alice (group dba; VIGIL_PERSON=LOGIN
#                                             for another) unless VIGIL_TOKEN is set
#   deploy/compose/stack.sh compose ARGS…     docker-compose with this stack's file and project
#
# build: the base image if there is none (deploy/docker/base-image.sh), the vigil image from
# binaries built on the host (deploy/docker/build.sh; --bins DIR, default
# ${CARGO_TARGET_DIR:-target}/release), then the stack's other images (PostgreSQL, the OIDC
# provider, the broker, HAProxy: `docker-compose build`, layers cached by the engine). Set
# VIGIL_COMPOSE_SKIP_VIGIL_BUILD=1 to keep an existing $VIGIL_IMAGE (one built from source).
# The engine must answer: deploy/compose/engine.sh start starts one where none runs.
#
#   VIGIL_COMPOSE_PROJECT     the Compose project name (default vigil): several stacks with
#                             different names and ports run side by side
#   VIGIL_COMPOSE_SSH_DIR     where the stack's SSH keys are made (default
#                             ~/.local/state/vigil-compose/PROJECT/ssh; removed by down)
#   VIGIL_COMPOSE_PG_PORT, VIGIL_COMPOSE_SSH_PORT, VIGIL_COMPOSE_STATS_PORT, VIGIL_COMPOSE_BIND, VIGIL_COMPOSE_NET,
#   VIGIL_IMAGE and the secrets: see docker-compose.yml
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
project="${VIGIL_COMPOSE_PROJECT:-vigil}"
pg_port="${VIGIL_COMPOSE_PG_PORT:-15432}"
stats_port="${VIGIL_COMPOSE_STATS_PORT:-18404}"
ssh_port="${VIGIL_COMPOSE_SSH_PORT:-12222}"
bind="${VIGIL_COMPOSE_BIND:-127.0.0.1}"
[[ "$bind" == 0.0.0.0 ]] && host=127.0.0.1 || host="$bind"

log() { printf 'stack.sh: %s\n' "$*" >&2; }
die() { printf 'stack.sh: ERROR: %s\n' "$*" >&2; exit 1; }

compose() { ssh_keys; docker-compose -f "$here/docker-compose.yml" -p "$project" "$@"; }

# The stack's SSH keys, made once per project in $ssh_dir (removed by `down`): the sshd's host
# key and the gateway's login key (sshd/: the host key, the login key's public half as
# authorized_keys), the gateway's own host key and its login key (node/: read by the nodes, who
# run as uid 10001). Exported for docker-compose.yml: where they are, the sshd's public host key.
ssh_dir="${VIGIL_COMPOSE_SSH_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/vigil-compose/$project/ssh}"
ssh_keys() {
  if [[ ! -s "$ssh_dir/sshd/authorized_keys" ]]; then
    command -v ssh-keygen >/dev/null || die "ssh-keygen not found (Debian's openssh-client)"
    rm -rf "$ssh_dir"
    mkdir -p "$ssh_dir/sshd" "$ssh_dir/node"
    ssh-keygen -q -t ed25519 -N '' -C vigil-compose-sshd -f "$ssh_dir/sshd/host_ed25519_key"
    ssh-keygen -q -t ed25519 -N '' -C vigil-compose-gateway -f "$ssh_dir/node/gateway_login_key"
    ssh-keygen -q -t ed25519 -N '' -C vigil-compose-gateway-host -f "$ssh_dir/node/gateway_host_ed25519_key"
    cp "$ssh_dir/node/gateway_login_key.pub" "$ssh_dir/sshd/authorized_keys"
    if [[ "$(id -u)" == 0 ]]; then
      chown 10001:10001 "$ssh_dir/node/gateway_login_key" "$ssh_dir/node/gateway_host_ed25519_key"
    else
      chmod 0644 "$ssh_dir/node/gateway_login_key" "$ssh_dir/node/gateway_host_ed25519_key"
    fi
  fi
  export VIGIL_COMPOSE_SSH_DIR="$ssh_dir"
  VIGIL_COMPOSE_SSHD_HOST_KEY="$(cut -d' ' -f1,2 "$ssh_dir/sshd/host_ed25519_key.pub")"
  export VIGIL_COMPOSE_SSHD_HOST_KEY
}

need_engine() {
  command -v docker-compose >/dev/null || die "docker-compose not found (apt-get install docker-compose; deploy/dev/setup.sh installs it)"
  docker info >/dev/null 2>&1 || die "the Docker engine does not answer (start one: deploy/compose/engine.sh start)"
}

cmd_build() {
  local bins=()
  while (($#)); do
    case "$1" in
      --bins) bins=(--bins "${2:?--bins DIR}"); shift 2 ;;
      *) die "unknown argument $1" ;;
    esac
  done
  need_engine
  "$root/deploy/docker/base-image.sh"
  # the host's own CAs (a TLS-inspecting proxy's) for the build stages: build-ca/README.md
  find "$here/build-ca" -name '*.crt' -delete
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$here/build-ca/"
  fi
  if [[ "${VIGIL_COMPOSE_SKIP_VIGIL_BUILD:-0}" == 1 ]]; then
    docker image inspect "${VIGIL_IMAGE:-vigil:latest}" >/dev/null 2>&1 \
      || die "VIGIL_COMPOSE_SKIP_VIGIL_BUILD=1 but there is no image ${VIGIL_IMAGE:-vigil:latest}"
  else
    "$root/deploy/docker/build.sh" "${bins[@]}" --tag "${VIGIL_IMAGE:-vigil:latest}"
  fi
  log "building the stack's other images (cached after the first time)"
  compose build -q postgres oidc kafka sshd haproxy || die "docker-compose build failed"
}

# Every gateway node UP in HAProxy's view (its /readyz answered 200).
nodes_up() {
  local csv
  csv="$(curl -fsS "http://$host:$stats_port/;csv" 2>/dev/null)" || return 1
  local want have
  want="$(grep -c '^gateways-postgres,node-' <<<"$csv" || true)"
  have="$(grep -c '^gateways-postgres,node-[^,]*,\([^,]*,\)\{15\}UP,' <<<"$csv" || true)"
  ((want > 0 && have == want))
}

cmd_up() {
  cmd_build "$@"
  log "starting project $project (PostgreSQL clients on $host:$pg_port)"
  compose up -d --no-build >/dev/null || { compose logs --no-color --tail 50 >&2; die "docker-compose up failed"; }
  local _
  for _ in $(seq 1 180); do
    nodes_up && break
    sleep 1
  done
  if ! nodes_up; then
    compose ps >&2
    compose logs --no-color --tail 30 >&2
    die "the gateway nodes did not become ready behind HAProxy within 180 s"
  fi
  log "ready"
  local p="" c=""
  [[ "$project" == vigil ]] || p="VIGIL_COMPOSE_PROJECT=$project "
  [[ "$pg_port" == 15432 ]] || p+="VIGIL_COMPOSE_PG_PORT=$pg_port "
  c="deploy/compose/stack.sh"
  cat <<TEXT

Vigil is up: 3 coordinator members, 2 gateway nodes behind HAProxy (PostgreSQL and SSH),
audit stream to Kafka. (Kubernetes: the stack has no API server of its own; deploy/cluster.sh
puts the nodes in front of the dev kube-apiserver, docs/kubernetes.md shows the [kubernetes]
section for yours.)

  # an agent's token, then psql through HAProxy (any user name; dbname = the connection)
  TOKEN=\$(${p}$c token agent-reporting)
  psql "host=$host port=$pg_port dbname=app user=agent sslmode=require password=\$TOKEN"

  # ssh through HAProxy to host web as vigil-ops; answer the prompt with an agent-ops token
  # (${p}$c token agent-ops); the gateway's host key is $ssh_dir/node/gateway_host_ed25519_key.pub
  ssh -p $ssh_port -o PreferredAuthentications=keyboard-interactive vigil-ops+web@$host hostname

  # writes to customers wait for approval (up to 2 minutes); approve as the person alice
  # (group dba; her ID token from the stack's provider; VIGIL_PERSON=… for another login)
  # (the stack's vigil runs without a terminal to ask at: read the request, then --yes)
  ${p}$c vigil approvals list --state pending
  ${p}$c vigil approvals show apr-…
  ${p}$c vigil approvals approve --yes apr-… --comment "looks fine"

  # the audit topic, verified against the coordinator's checkpoints
  ${p}$c compose exec node-1 vigil audit verify --kafka kafka:9092 --topic vigil-audit \\
      --witness coordinator-1:7470,coordinator-2:7470,coordinator-3:7470 --cluster-token-env VIGIL_CLUSTER_TOKEN

  HAProxy's view of the nodes: http://$host:$stats_port/
  Stop and remove everything: ${p}$c down
TEXT
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  build) shift; cmd_build "$@" ;;
  down) need_engine; compose down -v --remove-orphans; rm -rf "$ssh_dir" ;;
  token)
    [[ -n "${2:-}" ]] || die "usage: $0 token CLIENT_ID (agent-reporting, agent-ops, agent-denied)"
    need_engine; compose exec -T oidc token "$2" ;;
  vigil)
    shift; need_engine
    # A person's ID token (the coordinator members take no agent's token).
    token="${VIGIL_TOKEN:-$(compose exec -T oidc node /app/id-token.mjs --issuer http://oidc:8080 \
      --user "${VIGIL_PERSON:-alice}")}" || die "no ID token from the provider"
    compose run --rm -T -e VIGIL_TOKEN="$token" vigil "$@" ;;
  compose) shift; need_engine; compose "$@" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
