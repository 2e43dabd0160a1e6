"""``raychat <command>``: one console script for every stage (each also runs as ``python -m <module>``).

raychat make-sample --output runs/sample.jsonl
raychat pretokenize --input runs/sample.jsonl --output runs/tokenized
raychat train --data runs/tokenized --output runs/train
raychat serve --checkpoint runs/train/train
raychat pipeline                      # all of the above on the embedded default
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command → (module whose ``main(argv)`` runs it, one line of help). ``ray job submit`` runs the modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-sample": ("raychat.jobs.make_sample", "write the built-in sample conversations (JSONL)"),
    "pretokenize": ("raychat.jobs.pretokenize", "Ray Data: validate, template and tokenize JSONL into parquet"),
    "train": ("raychat.jobs.train.driver", "Ray Train + DeepSpeed: C-RLFT fine-tuning with checkpoints"),
    "serve": ("raychat.serve.__main__", "Ray Serve: the OpenAI-compatible endpoint for a checkpoint"),
    "pipeline": ("raychat.jobs.pipeline", "the whole spine on the embedded default, then ask the endpoint"),
}


def module_of(command: str) -> str:
    """The module ``ray job submit -- python -m …`` runs for ``command``."""
    return COMMANDS[command][0].removesuffix(".__main__").removesuffix(".driver")


def usage() -> str:
    name_w = max(map(len, COMMANDS))
    help_w = max(len(h) for _, h in COMMANDS.values())
    lines = ["usage: raychat <command> [options]      (raychat <command> --help lists its options)", "", "commands:"]
    lines += [
        f"  {name:<{name_w}}  {help_:<{help_w}}  python -m {module_of(name)}" for name, (_, help_) in COMMANDS.items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"raychat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
