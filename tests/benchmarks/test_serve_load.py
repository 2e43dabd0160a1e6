"""The in-process baselines of benchmarks/serve_load.py (its figures in docs/performance/ are ratios to them)."""

from benchmarks.serve_load import Sequential


def test_generate_baseline_makes_the_same_tokens_as_the_engine_baseline(tiny_model_dir):
    """transformers' `generate` and raychat's engine, greedy with the same stop ids, one request at
    a time: the same number of tokens, so their tokens/s compare like for like."""
    seq = Sequential.from_checkpoint(str(tiny_model_dir), threads=1)
    engine = seq.run(4, 24)
    gen = seq.run_generate(4, 24)
    assert engine["tokens"] == gen["tokens"] > 0
    assert gen["tok_s"] > 0
