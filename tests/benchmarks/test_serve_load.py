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


def test_bare_vllm_ceiling_makes_the_same_tokens_as_the_engine_baseline(tiny_model_dir):
    """The vllm arms' ceiling (vLLM in-process) decodes the same greedy tokens as the sequential baselines,
    so the benchmark's ratios compare like for like."""
    from benchmarks.serve_load import BareVLLM

    seq = Sequential.from_checkpoint(str(tiny_model_dir), threads=1)
    prompts = [seq.prompt(i) for i in range(4)]
    engine = seq.run(4, 24)
    bare = BareVLLM(str(tiny_model_dir), 8, int(seq.b.max_context), eager=True, kv_cache_gb=0.25)
    try:
        one, four = (bare.run(prompts, c, 24, sorted(seq.b.stop_ids)) for c in (1, 4))
    finally:
        bare.close()
    assert one["tokens"] == four["tokens"] == engine["tokens"] > 0
    assert len(one["ttft"]) == 4 and all(t > 0 for t in one["ttft"])
