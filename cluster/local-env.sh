# source cluster/local-env.sh — point `ray job submit` / `ray job ...` at the local head started by
# cluster/start-local.sh, with Ray token auth (the CLIs read ~/.ray/auth_token).
# RAY_ADDRESS stays unset: `ray.init()`, `serve run` and `python -m raychat.serve` then join the running
# local cluster by themselves, and `serve deploy` talks to http://localhost:8265 by default.
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
export RAY_AUTH_MODE=token
