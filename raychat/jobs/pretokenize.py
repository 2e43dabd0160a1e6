"""Ray Data job: conversation files → validated, cleaned, tokenized parquet shards.

    python -m raychat.jobs.pretokenize --input data/ --output runs/tokenized
    python -m raychat.jobs.pretokenize --config configs/data/pretokenize-sharegpt.yaml --input s3://bucket/sharegpt/ --output s3://bucket/tok

Streams every input (JSONL or JSON arrays, local or s3://) through a pool of tokenizer actors
and writes, under ``--output``: ``*.parquet`` (rows, schema metadata saying how they were made),
``_quarantine/*.jsonl`` (every rejected record with file, index and reason), ``_meta.json`` and
``_report.json`` (counts that reconcile: read = written + quarantined + dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from raychat.core.common import node_cache, storage
from raychat.core.common.cli import parse_config
from raychat.core.common.report import format_table
from raychat.core.config import PretokenizeConfig
from raychat.core.data.dataset import METADATA_KEY, ROW_SCHEMA, TOKENIZER_CACHE, data_metadata
from raychat.core.data.formats import SourceRules, SourceSpec
from raychat.core.data.rows import (
    RECORD_SCHEMA,
    RowPolicy,
    Stats,
    batch_key,
    plan_tokenizer_pool,
    process_records,
)
from raychat.jobs._ray import init_ray, log, setup_logging

QUARANTINE_DIR = "_quarantine"
RECORDS_PER_BLOCK = 2048
READ_CPUS = 0.1
READ_BLOCK_BYTES = 16 * 2**20


class ConversationFiles(FileBasedDatasource):
    """Ray Data source: each file streamed into raw records (:data:`RECORD_SCHEMA`), never loaded whole."""

    def __init__(self, paths: list[str], filesystem: pafs.FileSystem):
        super().__init__(paths, filesystem=filesystem)
        self._fs = filesystem

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        from raychat.core.data.readers import iter_records

        file = storage.display_uri(self._fs, path)
        cols: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
        for rec in iter_records(f):
            cols["file"].append(file)
            cols["index"].append(rec.index)
            cols["text"].append(rec.text)
            cols["error"].append(rec.error)
            cols["detail"].append(rec.detail)
            if len(cols["text"]) >= RECORDS_PER_BLOCK:
                yield pa.table(cols, schema=RECORD_SCHEMA)
                cols = {name: [] for name in RECORD_SCHEMA.names}
        if cols["text"]:
            yield pa.table(cols, schema=RECORD_SCHEMA)


@ray.remote(num_cpus=0)
class Ledger:
    """Job-wide state shared by the tokenizer actors: duplicate claims and per-batch counts.

    Both are keyed so that a retried batch neither drops its own rows as duplicates nor counts twice.
    """

    def __init__(self):
        self._owner: dict[bytes, int] = {}
        self._stats: dict[str, dict] = {}

    def claim(self, hashes: list[bytes], owners: list[str]) -> list[bool]:
        out = []
        for h, o in zip(hashes, owners):
            key = int.from_bytes(hashlib.blake2b(o.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            out.append(self._owner.setdefault(h, key) == key)
        return out

    def record(self, key: str, stats: dict) -> None:
        self._stats[key] = stats

    def summary(self) -> dict:
        return Stats.merge(list(self._stats.values()))


class TokenizeBatch:
    """Ray Data actor: one tokenizer; turns a batch of raw records into rows and quarantine files."""

    def __init__(self, cfg: dict, ledger, schema_metadata: bytes, threads: int):
        # Before the tokenizers library starts its thread pool (the actor has its own process).
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        c = PretokenizeConfig.model_validate(cfg)
        from raychat.core.data.templates import get_template
        from raychat.core.data.tokenizer import ConversationTokenizer, load_data_encoder

        local = node_cache.local_or_download(c.tokenizer, TOKENIZER_CACHE) if c.tokenizer else None
        template = get_template(c.template)
        self.ct = ConversationTokenizer(load_data_encoder(local), template, c.max_length)
        self.policy = RowPolicy(
            rules=source_rules(c, template.default_condition),
            fmt=c.format,
            same_role=c.same_role,
            dedupe=c.dedupe,
            strict=c.strict,
        )
        self.output = c.output
        self.ledger = ledger
        self.schema = ROW_SCHEMA.with_metadata({METADATA_KEY: schema_metadata})

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        files, indices = batch["file"].tolist(), batch["index"].tolist()
        claim = (lambda h, o: ray.get(self.ledger.claim.remote(h, o))) if self.policy.dedupe else None
        res = process_records(
            files,
            indices,
            batch["text"].tolist(),
            batch["error"].tolist(),
            batch["detail"].tolist(),
            self.ct,
            self.policy,
            claim,
            self.schema,
        )
        key = batch_key(files, indices)
        if res.quarantined:
            storage.write_text(
                storage.join(self.output, QUARANTINE_DIR, f"{key}.jsonl"),
                "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in res.quarantined),
            )
        self.ledger.record.remote(key, res.stats.to_dict())
        return res.table


def source_rules(cfg: PretokenizeConfig, default_condition: str) -> SourceRules:
    return SourceRules(
        sources={k: SourceSpec(v.condition, v.weight) for k, v in cfg.sources.items()},
        source_field=cfg.source_field,
        file_sources=tuple(cfg.file_sources.items()),
        default_source=cfg.default_source,
        fallback=SourceSpec(default_condition, 1.0),
    )


def _prepare_output(uri: str) -> None:
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise SystemExit(f"--output {uri} is a file; give a directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        raise SystemExit(f"--output {uri} is not empty; choose a new directory (nothing is overwritten)")


def _strict_message(err: BaseException) -> str | None:
    m = re.search(r"StrictModeError: (.+)", str(err))
    return m.group(1).strip() if m else None


def run(cfg: PretokenizeConfig) -> dict:
    """Runs the job and returns the report (also written to ``<output>/_report.json``)."""
    init_ray()
    _prepare_output(cfg.output)
    t0 = time.time()
    try:
        in_fs, files = storage.expand_inputs(cfg.input)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--input: {e}") from None
    meta = data_metadata(cfg.template, cfg.tokenizer, cfg.max_length)
    log.info("%d input file(s), template %s, max length %d", len(files), cfg.template, meta["max_length"])
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    pool = plan_tokenizer_pool(node_cpus, cfg.tokenizer_threads, cfg.num_actors, reserved=2 * READ_CPUS)
    cpus = int(sum(node_cpus))
    if pool.actors > pool.fits:
        log.warning(
            "--num-actors %d: only %d fit on the cluster's nodes now; the others wait for nodes to join",
            pool.actors,
            pool.fits,
        )
    ledger = Ledger.remote()
    out_fs, out_path = storage.resolve(cfg.output)
    # Reading is light (scanning JSON); a small CPU reservation keeps read tasks schedulable while
    # the tokenizer actors hold most of each node — with whole CPUs the reads would wait on the actors forever.
    # Emit read blocks every ~16 MiB (not Ray Data's 128 MiB) so tokenizing starts while files are read.
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = min(ctx.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)
    records = ray.data.read_datasource(
        ConversationFiles(files, in_fs), num_cpus=READ_CPUS, concurrency=max(1, min(cpus, len(files)))
    )
    rows = records.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(),
            "ledger": ledger,
            "schema_metadata": json.dumps(meta).encode(),
            "threads": pool.threads,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
    )
    try:
        rows.write_parquet(
            out_path,
            filesystem=out_fs,
            min_rows_per_file=cfg.rows_per_file,
            # Writing is light too: shards are written while tokenizing goes on, not after it.
            ray_remote_args={"num_cpus": READ_CPUS},
            # Token ids do not repeat enough for dictionary pages; the tag-like columns do.
            use_dictionary=["source", "condition", "file", "weights"],
        )
    except Exception as e:
        msg = _strict_message(e)
        if msg:
            raise SystemExit(f"--strict: bad row: {msg}") from None
        raise

    report = ray.get(ledger.summary.remote())
    parquet_files = storage.list_files(cfg.output, ".parquet")
    on_disk = sum(pq.read_metadata(p, filesystem=out_fs).num_rows for p in parquet_files)
    report.update(
        input=[storage.display_uri(in_fs, f) for f in files],
        output=cfg.output,
        parquet_files=len(parquet_files),
        quarantine=storage.join(cfg.output, QUARANTINE_DIR),
        tokenizer_actors=pool.actors,
        tokenizer_threads=pool.threads,
        metadata=meta,
        wall_time_s=round(time.time() - t0, 2),
        # Peak RSS of this driver process: bounded by design (rows stream through Ray Data).
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    if report["read"] != report["written"] + report["quarantined"] + report["dropped"] or on_disk != report["written"]:
        raise RuntimeError(f"row accounting does not reconcile ({on_disk} rows on disk): {report}")
    storage.write_text(storage.join(cfg.output, "_meta.json"), json.dumps(meta, indent=2))
    storage.write_text(storage.join(cfg.output, "_report.json"), json.dumps(report, indent=2))
    return report


def summary_table(report: dict) -> str:
    rows = [
        ("input files", len(report["input"])),
        ("rows read", report["read"]),
        ("rows written", report["written"]),
        ("rows quarantined", report["quarantined"]),
        *[(f"  quarantined: {k}", v) for k, v in sorted(report["quarantined_by_reason"].items())],
        ("rows dropped", report["dropped"]),
        *[(f"  dropped: {k}", v) for k, v in sorted(report["dropped_by_reason"].items())],
        ("rows truncated", report["truncated"]),
        ("tokens", report["tokens"]),
        ("supervised tokens", report["supervised_tokens"]),
        *[(f"source {k}: rows / tokens", f"{v['rows']:,} / {v['tokens']:,}") for k, v in report["by_source"].items()],
        *[(f"condition {k!r}: rows", v["rows"]) for k, v in report["by_condition"].items()],
        ("parquet files", report["parquet_files"]),
        ("tokenizer actors × threads", f"{report['tokenizer_actors']} × {report['tokenizer_threads']}"),
        ("wall time (s)", report["wall_time_s"]),
        ("driver peak RSS (MB)", report["driver_peak_rss_mb"]),
        ("output", report["output"]),
    ]
    return format_table("pretokenize summary", rows)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(PretokenizeConfig, argv, prog="raychat pretokenize")
    report = run(cfg)
    print(summary_table(report))
    if report["quarantined"]:
        print(f"quarantined rows (original record, file, index, reason): {report['quarantine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
