#!/usr/bin/env bash
# A local attested cluster: a Dask scheduler, N attested workers and a head kernel (`serve --cluster`), on loopback.
#   bash scripts/cluster.sh                     2 workers, in the foreground; Ctrl-C stops every node
#   bash scripts/cluster.sh --workers 3 --netns each node in its own network namespace (root only)
#   bash scripts/cluster.sh down                stop the cluster a detached (--detach) launcher runs
#   bash scripts/cluster.sh status              what runs, and what a notebook pins to connect
# Any other flag goes to `mesatee-enclave cluster up` (--data-dir D, --port, --head-port, --detach; see --help).
# softtee is SOFTWARE trust: whoever runs this host can read every node's memory (docs/cluster.md).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
action=up
case "${1:-}" in
  up|down|status) action="$1"; shift ;;
esac
exec python -m mesatee_notebook.cli enclave cluster "$action" "$@"
