#!/usr/bin/env bash
# Start a local Ray head from the project's virtualenv: dashboard / Jobs API on 127.0.0.1:8265,
# Prometheus metrics on :8080, Ray token authentication on (token in ~/.ray/auth_token).
# Then point the CLIs at it:  source cluster/local-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
export RAY_AUTH_MODE=token
# Serve's throughput-optimized runtime with HAProxy ingress (raychat/core/common/ray_env.py; RAYCHAT_SERVE_INGRESS=proxy keeps Serve's proxy).
eval "$("${PY:-.venv/bin/python}" -m raychat.core.common.ray_env --local)"
"$RAY" get-auth-token --generate >/dev/null
"$RAY" start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
  --metrics-export-port 8080 --num-cpus "${NUM_CPUS:-$(nproc)}" --disable-usage-stats "$@"
echo "Ray head up: dashboard and Jobs API at http://127.0.0.1:8265 — now run: source cluster/local-env.sh"
