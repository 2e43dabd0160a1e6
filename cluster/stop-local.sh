#!/usr/bin/env bash
# Stop the local Ray head (and any Serve apps on it) started by cluster/start-local.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
"${RAY:-.venv/bin/ray}" stop "$@"
