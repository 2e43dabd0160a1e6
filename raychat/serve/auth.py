"""API keys for the OpenAI endpoint (Ray-free): where they come from and how a request is checked.

Keys come from an environment variable (comma-separated) and/or a file with one key per line
(a mounted Kubernetes secret); they are never logged or put in configs. A request carries
``Authorization: Bearer <key>``; every configured key is compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


class NoApiKeysError(ValueError):
    """Auth is on but no key is configured (serving without keys needs an explicit flag)."""


def load_api_keys(
    env_var: str | None, file: str | os.PathLike | None, env: Mapping[str, str] | None = None
) -> list[str]:
    """The configured keys: ``env[env_var]`` split on commas, plus non-empty, non-``#`` lines of ``file``.

    Raises:
        FileNotFoundError: when ``file`` is given but missing (a secret that failed to mount).
    """
    env = os.environ if env is None else env
    keys = []
    if env_var:
        keys += [k.strip() for k in env.get(env_var, "").split(",")]
    if file:
        keys += [line.strip() for line in Path(file).read_text().splitlines() if not line.strip().startswith("#")]
    return list(dict.fromkeys(k for k in keys if k))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def key_matches(token: str | None, keys: Sequence[str]) -> bool:
    """True when ``token`` equals one of ``keys``; compares against every key in constant time."""
    if token is None:
        return False
    got = token.encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(got, k.encode())
    return ok
