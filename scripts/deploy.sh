#!/usr/bin/env bash
# deploy.sh: the interface teams already call from CI over SSH.
#
#   deploy.sh <environment> <commit_sha>   deploy release <commit_sha>
#   deploy.sh <environment> rollback       put the previous release back
#
# Each environment is described by $DEPLOY_ENV_DIR/<environment>.env
# (default /etc/deploy-agent/environments), a shell file that sets:
#   PROJECT=web                          # project name on this host
#   COMPOSE_FILE=/srv/web/compose.yml    # the compose file
#   DEPLOY_VARS="KEY=value OTHER=value"  # optional --var values
#
# Exit codes: 0 success; 1 health check failure (rolled back, the previous
# release serves); 2 configuration error; 3 registry authentication failure
# or image not found. deploy-agent's own 4 (another deploy holds the lock) and
# 5 (host not ready: Docker or the proxy down) pass through unchanged.
set -uo pipefail

usage() {
	echo "usage: deploy.sh <environment> <commit_sha>|rollback" >&2
	exit 2
}

[ $# -eq 2 ] || usage
env_name=$1
what=$2
agent=${DEPLOY_AGENT:-deploy-agent}
env_dir=${DEPLOY_ENV_DIR:-/etc/deploy-agent/environments}

if ! [[ $env_name =~ ^[a-z0-9][a-z0-9_-]*$ ]]; then
	echo "deploy.sh: environment name '$env_name' is invalid (use a-z, 0-9, _ and -)" >&2
	exit 2
fi
env_file=$env_dir/$env_name.env
if [ ! -r "$env_file" ]; then
	echo "deploy.sh: no configuration for environment '$env_name': $env_file is missing or unreadable" >&2
	exit 2
fi
PROJECT=
COMPOSE_FILE=
DEPLOY_VARS=
# shellcheck source=/dev/null
. "$env_file"
if [ -z "$PROJECT" ] || [ -z "$COMPOSE_FILE" ]; then
	echo "deploy.sh: $env_file must set PROJECT and COMPOSE_FILE" >&2
	exit 2
fi
if ! command -v "$agent" >/dev/null 2>&1; then
	echo "deploy.sh: '$agent' not found; install the deploy-agent package or set DEPLOY_AGENT" >&2
	exit 2
fi

reason="deploy.sh $env_name $what${GITHUB_RUN_ID:+ (GitHub run $GITHUB_RUN_ID)}"
if [ "$what" = rollback ]; then
	"$agent" rollback --project "$PROJECT" --reason "$reason"
	exit $?
fi
if ! [[ $what =~ ^[0-9a-fA-F]{7,40}$ ]]; then
	echo "deploy.sh: '$what' is not a commit sha (7 to 40 hex digits) nor 'rollback'" >&2
	exit 2
fi
args=()
# Split on whitespace without pathname expansion (a value may hold a '*').
read -r -a vars <<<"$DEPLOY_VARS"
for kv in "${vars[@]}"; do
	args+=(--var "$kv")
done
"$agent" deploy --project "$PROJECT" --file "$COMPOSE_FILE" --release "$what" --reason "$reason" "${args[@]}"
exit $?
