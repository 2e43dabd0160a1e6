#!/usr/bin/env bash
# Start a local Ray head from the project's virtualenv: dashboard on 127.0.0.1:8265,
# Prometheus metrics on :8080. Then: export RAY_ADDRESS=http://127.0.0.1:8265
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
"$RAY" start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
  --metrics-export-port 8080 --num-cpus "${NUM_CPUS:-$(nproc)}" --disable-usage-stats "$@"
echo "Ray head up. Jobs API / dashboard: http://127.0.0.1:8265  (export RAY_ADDRESS=http://127.0.0.1:8265)"
