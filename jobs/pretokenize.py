"""Ray Data job: conversation JSONL → validated, templated, tokenized parquet shards.

    python -m jobs.pretokenize --input data.jsonl --output runs/demo/tokenized

Writes ``<output>/*.parquet`` (one row per conversation, see :data:`libs.pretokenize.ROW_SCHEMA`),
``<output>/_quarantine/*.jsonl`` (every rejected line with its file and reason),
``<output>/_meta.json`` (template, tokenizer, max length) and ``<output>/_report.json``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs
import ray

from jobs._ray import init_ray, log, setup_logging
from libs import storage
from libs.cli import parse_config
from libs.config import PretokenizeConfig
from libs.pretokenize import batch_key, merge_counts, process_lines
from libs.report import format_table

QUARANTINE_DIR = "_quarantine"
STATS_DIR = "_stats"


class TokenizeBatch:
    """Ray Data actor: holds one tokenizer, turns a batch of lines into rows, writes side files."""

    def __init__(self, cfg: dict, output: str):
        from libs.templates import get_template
        from libs.tokenization import ConversationTokenizer, load_tokenizer

        c = PretokenizeConfig.model_validate(cfg)
        local = storage.local_or_download(c.tokenizer, "/tmp/raychat/tokenizers") if c.tokenizer else None
        self.ct = ConversationTokenizer(load_tokenizer(local), get_template(c.template), c.max_length)
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]):
        lines = [str(x) for x in batch["text"]]
        sources = [str(x) for x in batch["path"]]
        res = process_lines(lines, sources, self.ct)
        key = batch_key(lines, sources)
        if res.quarantined:
            storage.write_text(
                storage.join(self.output, QUARANTINE_DIR, f"{key}.jsonl"),
                "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in res.quarantined),
            )
        storage.write_text(storage.join(self.output, STATS_DIR, f"{key}.json"), json.dumps(res.counts()))
        return res.table


def _prepare_output(uri: str) -> None:
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise SystemExit(f"--output {uri} is a file; give a directory")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise SystemExit(f"--output {uri} is not empty; choose a new directory (nothing is overwritten)")


def run(cfg: PretokenizeConfig) -> dict:
    """Runs the job and returns the report (also written to ``<output>/_report.json``)."""
    init_ray()
    _prepare_output(cfg.output)
    t0 = time.time()
    in_fs, in_path = storage.resolve(cfg.input)
    if in_fs.get_file_info(in_path).type == pafs.FileType.NotFound:
        raise SystemExit(f"--input {cfg.input}: not found")
    out_fs, out_path = storage.resolve(cfg.output)
    ds = ray.data.read_text(in_path, filesystem=in_fs, include_paths=True, file_extensions=None)
    rows = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"cfg": cfg.model_dump(), "output": cfg.output},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=1,
    )
    rows.write_parquet(out_path, filesystem=out_fs)

    stats = [json.loads(storage.read_text(_uri_like(cfg.output, p))) for p in storage.list_files(storage.join(cfg.output, STATS_DIR), ".json")]
    report = merge_counts(stats)
    report.update(
        input=cfg.input,
        output=cfg.output,
        quarantine=storage.join(cfg.output, QUARANTINE_DIR),
        template=cfg.template,
        tokenizer=cfg.tokenizer or "embedded",
        max_length=cfg.max_length,
        wall_time_s=round(time.time() - t0, 2),
    )
    if report["read"] != report["written"] + report["quarantined"] + report["dropped"]:
        raise RuntimeError(f"row accounting does not reconcile: {report}")
    meta = {k: report[k] for k in ("template", "tokenizer", "max_length")}
    storage.write_text(storage.join(cfg.output, "_meta.json"), json.dumps(meta, indent=2))
    storage.write_text(storage.join(cfg.output, "_report.json"), json.dumps(report, indent=2))
    return report


def _uri_like(base_uri: str, fs_path: str) -> str:
    """Turns a filesystem path from :func:`storage.list_files` back into a URI of ``base_uri``'s kind."""
    return f"s3://{fs_path}" if storage.is_s3(base_uri) else fs_path


def summary_table(report: dict) -> str:
    rows = [
        ("rows read", report["read"]),
        ("rows written", report["written"]),
        ("rows quarantined", report["quarantined"]),
        *[(f"  quarantined: {k}", v) for k, v in sorted(report["quarantined_by_reason"].items())],
        ("rows dropped", report["dropped"]),
        *[(f"  dropped: {k}", v) for k, v in sorted(report["dropped_by_reason"].items())],
        ("rows truncated", report["truncated"]),
        ("tokens", report["tokens"]),
        ("supervised tokens", report["supervised_tokens"]),
        ("wall time (s)", report["wall_time_s"]),
        ("output", report["output"]),
    ]
    return format_table("pretokenize summary", rows)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(PretokenizeConfig, argv, prog="python -m jobs.pretokenize")
    report = run(cfg)
    print(summary_table(report))
    if report["quarantined"]:
        print(f"quarantined rows (original record + reason): {report['quarantine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
