"""``python -m raychat.jobs.train``: the entry point ``ray job submit`` runs (same as ``raychat train``)."""

import sys

from raychat.jobs.train.driver import main

if __name__ == "__main__":
    sys.exit(main())
