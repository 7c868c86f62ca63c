"""loralab.measurement: median wall-clock timing, absolute peak memory, exact weight bytes; and
the two benchmarks that use it."""

import argparse
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from loralab.measurement import (
    PeakMemory,
    allocator_in_use,
    definition,
    materialize_weights,
    process_peak_rss_bytes,
    reset_peak_rss,
    set_threads,
    time_calls,
    weights_bytes,
)

MIB = 2**20
CPU = torch.device("cpu")
needs_mallinfo2 = pytest.mark.skipif(allocator_in_use() is None, reason="needs glibc mallinfo2")


def test_time_calls_is_the_median_of_the_timed_calls_after_the_warmup():
    sleeps = iter([0.4, 0.02, 0.16, 0.07])  # the first is the warm-up
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(next(sleeps))

    timing = time_calls(fn, CPU, repeats=3, warmup=1)
    assert len(calls) == 4 and len(timing.times_s) == 3
    assert max(timing.times_s) < 0.4  # the warm-up is not timed
    assert 0.07 <= timing.median_s < 0.16
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_calls(fn, CPU, repeats=0)


@needs_mallinfo2
def test_peak_memory_is_absolute_and_counts_what_lives_before_and_inside_the_block():
    with PeakMemory(CPU) as idle:
        time.sleep(0.02)
    held = torch.ones(32 * MIB // 4)  # allocated before the block, alive in it: "weights"
    with PeakMemory(CPU) as holding:
        time.sleep(0.02)
    assert idle.peak_bytes is not None and holding.peak_bytes is not None
    assert holding.peak_bytes - idle.peak_bytes == pytest.approx(32 * MIB, rel=0.1)
    with PeakMemory(CPU) as transient:
        x = torch.ones(48 * MIB // 4)  # freed before the block ends: the peak still sees it
        time.sleep(0.05)
        del x
    assert transient.peak_bytes is not None
    assert transient.peak_bytes - holding.peak_bytes == pytest.approx(48 * MIB, rel=0.1)
    assert transient.mib == round(transient.peak_bytes / MIB, 1)
    del held


@pytest.mark.skipif(process_peak_rss_bytes() is None, reason="needs Linux /proc")
def test_reset_peak_rss_forgets_a_peak_that_is_gone():
    big = torch.ones(300 * MIB // 4)  # 300 MiB touched, then freed (mmap'd: returned to the OS)
    with_big = process_peak_rss_bytes()
    del big
    if not reset_peak_rss():
        pytest.skip("the kernel refuses clear_refs here")
    after = process_peak_rss_bytes()
    assert with_big is not None and after is not None
    assert with_big - after > 250 * MIB


def test_weights_bytes_counts_each_storage_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as a language model's input and output embeddings
    model.register_buffer("scale", torch.zeros(3, dtype=torch.float64))
    assert weights_bytes(model) == (10 * 4 + 10) * 4 + 3 * 8
    assert weights_bytes(model, exclude=[model[1].bias]) == 10 * 4 * 4 + 3 * 8


@needs_mallinfo2
def test_materialize_weights_makes_mapped_weights_visible_to_the_allocator(tmp_path: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # safetensors
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = allocator_in_use()
    materialize_weights(model)
    grown = allocator_in_use() - before  # type: ignore[operator]
    assert grown == pytest.approx(weights_bytes(model), rel=0.05)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_set_threads_sets_and_reports_and_refuses_zero():
    previous = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1  # None leaves the count as it is
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(previous)


def test_definition_records_its_parameters():
    d = definition(CPU, repeats=5, warmup=1, threads=2)
    assert (d["repeats"], d["warmup"], d["threads"], d["sample_period_ms"]) == (5, 1, 2, 1.0)


def test_bench_train_uses_the_definition(compose_cfg):
    from loralab.training.bench import bench_train

    cfg = compose_cfg(["bench.steps=3", "bench.warmup=1", "bench.threads=1"], "bench_train")
    out = bench_train(cfg)
    assert out["measurement"]["repeats"] == 3 and out["measurement"]["threads"] == 1
    assert out["tokens_per_s"] > 0 and out["padded_tokens_per_s"] >= out["tokens_per_s"]
    if out["peak_memory_mb"] is not None:  # absolute: it holds at least the weights
        assert out["peak_memory_mb"] > out["weights_mb"] > 0


def test_bench_moelora_worker_measures_inference_with_the_definition(smoke_experts):
    spec = importlib.util.spec_from_file_location(
        "bench_moelora", Path(__file__).resolve().parents[1] / "scripts" / "bench_moelora.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from loralab.base_model import load_base_model

    base, _ = load_base_model(smoke_experts["cfg"].base_model)
    ids = torch.randint(10, 200, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    args = argparse.Namespace(repeats=3, new_tokens=4, train_steps=2)
    row = bench.measure_inference(base, batch, args, CPU)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert row["weights_mib"] == round(weights_bytes(base) / MIB, 1)
    if row["peak_mem_mib"] is not None:
        assert row["peak_mem_mib"] > row["weights_mib"]
