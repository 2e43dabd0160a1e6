"""Write raychat's built-in sample conversations (two C-RLFT sources + a few malformed rows).

python -m raychat.jobs.make_sample --output runs/sample.jsonl      # or s3://bucket/raychat/sample.jsonl
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from raychat.core.common import storage
from raychat.core.common.cli import parse_config
from raychat.core.config import MakeSampleConfig
from raychat.core.data.sample import BAD_ROWS, sample_jsonl


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(MakeSampleConfig, argv, prog="raychat make-sample")
    storage.write_text(cfg.output, sample_jsonl(cfg.rows, cfg.seed, include_bad_rows=cfg.bad_rows))
    print(
        f"wrote {cfg.rows} conversations{f' + {len(BAD_ROWS)} malformed rows' if cfg.bad_rows else ''} to {cfg.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
