"""The data → train contract: the rows training reads, and how they were made (Ray-free).

The data stage writes parquet files with :data:`ROW_SCHEMA`; each file's schema metadata holds,
under :data:`METADATA_KEY`, the JSON of :func:`data_metadata` (template, tokenizer and its
vocabulary fingerprint, max length, end-of-turn id). Training reads the metadata back and
refuses data made with another tokenizer than its model's (:func:`check_data_matches_model`).
"""

from __future__ import annotations

import json
import tempfile

import pyarrow as pa

from raychat.core.common import node_cache, storage
from raychat.core.data.tokenizer import EOT_TOKEN

#: What training reads. ``weights[t]`` weighs predicting ``input_ids[t]`` (unshifted).
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("condition", pa.string()),
        ("file", pa.string()),
        ("index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("length", pa.int32()),
        ("total_weight", pa.float32()),
    ]
)

#: Key of the parquet schema metadata entry describing how rows were made.
METADATA_KEY = b"raychat"

#: Where a node keeps its copies of ``s3://`` tokenizers.
TOKENIZER_CACHE = "/tmp/raychat/tokenizers"


def data_metadata(
    template: str, tokenizer: str | None, max_length: int | None, cache_root: str = TOKENIZER_CACHE
) -> dict:
    """How the rows are made; training refuses data whose metadata does not match its model.

    Args:
        template: the chat template's name.
        tokenizer: the tokenizer's directory URI (local or ``s3://``), or None for the embedded one.
        max_length: the longest row in tokens, or None for the tokenizer's own limit.
        cache_root: where an ``s3://`` tokenizer is copied on this node.

    Raises:
        ValueError: when the template and the tokenizer do not go together (checked here, before any row).
    """
    from raychat.core.data.templates import get_template
    from raychat.core.data.tokenizer import ConversationTokenizer, load_data_encoder, tokenizer_fingerprint

    local = node_cache.local_or_download(tokenizer, cache_root) if tokenizer else None
    enc = load_data_encoder(local)
    ct = ConversationTokenizer(enc, get_template(template), max_length)  # fails fast on a bad pairing
    return {
        "template": template,
        "tokenizer": tokenizer or "embedded",
        "tokenizer_fingerprint": tokenizer_fingerprint(enc),
        "vocab_size": len(enc.vocab()),
        "max_length": ct.max_length,
        "eot_id": ct.eot_id,
    }


def check_data_matches_model(data_uri: str, base_uri: str) -> dict:
    """Refuses data tokenized with another tokenizer than the model's (vocabulary fingerprints differ).

    A base model without ``<|end_of_turn|>`` gets it added for training (see
    :func:`raychat.core.model.hf.add_missing_eot`), so its fingerprint is taken with that token added too.

    Returns:
        The data's metadata.

    Raises:
        SystemExit: naming the mismatch (or missing data / metadata) and how to fix it.
    """
    import pyarrow.parquet as pq
    from tokenizers import AddedToken

    from raychat.core.data.tokenizer import RustEncoder, tokenizer_fingerprint

    fs, _ = storage.resolve(data_uri)
    files = storage.list_files(data_uri, ".parquet")
    if not files:
        raise SystemExit(f"--data {data_uri}: no parquet files (run raychat.jobs.pretokenize first)")
    raw = (pq.read_schema(files[0], filesystem=fs).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SystemExit(
            f"--data {data_uri}: no raychat metadata in the parquet schema; re-run raychat.jobs.pretokenize"
        )
    meta = json.loads(raw)
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_files(base_uri, tmp, ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
        encoder = RustEncoder(tmp)
        if EOT_TOKEN not in encoder.vocab():
            encoder.rust.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
        model_fp = tokenizer_fingerprint(encoder)
    if meta.get("tokenizer_fingerprint") != model_fp:
        raise SystemExit(
            f"--data {data_uri} was tokenized with tokenizer {meta.get('tokenizer')!r} "
            f"(fingerprint {meta.get('tokenizer_fingerprint')}), but the model {base_uri} has tokenizer fingerprint {model_fp}: "
            "re-run raychat.jobs.pretokenize with --tokenizer pointing at the model"
        )
    return meta
