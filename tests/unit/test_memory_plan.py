"""The memory planner: its predictions against the H200 peaks in docs/BENCHMARKS.md, its tracing against real
tensors, its arithmetic per ZeRO stage, the search and the pre-flight advice, and `cogvx plan`'s errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cogvx_dist.core.families import get_family
from cogvx_dist.core.lora import LoraSettings
from cogvx_dist.core.units import GIB
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.memory.plan import (
    GPU_CLASSES,
    H200_MEASURED_PEAKS_GIB,
    DeepSpeedBuffers,
    Strategy,
    buffers_from_ds_config,
    frontier,
    plan_memory,
    search,
    strategy_from_ds_config,
)
from cogvx_dist.train.memory.runs import PlannedRun, cheapest_change, largest_geometry, run_from_family
from cogvx_dist.train.memory.trace import StepShape, StepTrace, trace_step, trace_step_on_real_tensors
from tests.helpers import assert_one_line_error, cli


def full_size(family_name: str, checkpointing: int, frames: int = 49, height: int = 480,
              width: int = 720) -> StepShape:
    family = get_family(family_name)
    return StepShape(family, family.full_size_transformer, frames, height, width, 1, LoraSettings(), checkpointing)


def two_layers(family_name: str, checkpointing: int, dtype: torch.dtype = torch.bfloat16) -> StepShape:
    """The family's real block (hidden size, heads, text width) twice, on a small clip."""
    family = get_family(family_name)
    frames = 2 * family.frame_multiple + 1
    return StepShape(family, {**family.full_size_transformer, "num_layers": 2}, frames, 64, 96, 1, LoraSettings(),
                     checkpointing, dtype=dtype)


# Fake against real tensors in float32: this CPU has no bf16 matrix units, so a real bf16 step of the full-width
# block took 130-250 s per test (fp32: 2-3 s). What is compared, the allocations the step makes, does not depend on
# the element type beyond its size; bf16 is what the H200 comparison above predicts.
TRACED_DTYPE = torch.float32


@pytest.mark.slow
@pytest.mark.parametrize(("family", "checkpointing", "zero", "measured_gib"), H200_MEASURED_PEAKS_GIB)
def test_predicted_peak_is_within_15_percent_of_the_h200_measurement(family, checkpointing, zero, measured_gib):
    plan = plan_memory(full_size(family, checkpointing), Strategy(zero, gradient_checkpointing=checkpointing), 1)
    predicted = plan.peak / GIB
    assert abs(predicted / measured_gib - 1) < 0.15, (predicted, measured_gib)


@pytest.mark.parametrize("checkpointing", [1, 0])
def test_fake_tensor_peak_equals_the_same_accounting_on_real_tensors(checkpointing):
    shape = two_layers("CogVideoX-2b", checkpointing, TRACED_DTYPE)
    fake, real = trace_step(shape), trace_step_on_real_tensors(shape)
    assert abs(fake.activation_peak / real.activation_peak - 1) < 0.05, (fake.activation_peak, real.activation_peak)
    assert (fake.frozen_parameters, fake.lora_parameters) == (real.frozen_parameters, real.lora_parameters)


def test_fake_tensor_tracing_is_exact_for_rotary_temporal_patches_and_image_conditioning():
    shape = two_layers("CogVideoX1.5-5b-I2V", 1, TRACED_DTYPE)
    fake, real = trace_step(shape), trace_step_on_real_tensors(shape)
    assert abs(fake.activation_peak / real.activation_peak - 1) < 0.05, (fake.activation_peak, real.activation_peak)


def test_fake_tensor_tracing_is_exact_for_one_rank_of_a_sequence_parallel_group():
    shape = dataclasses.replace(two_layers("CogVideoX-5b", 1, TRACED_DTYPE), sequence_parallel=2)
    fake, real = trace_step(shape), trace_step_on_real_tensors(shape)
    assert abs(fake.activation_peak / real.activation_peak - 1) < 0.05, (fake.activation_peak, real.activation_peak)


def test_activations_and_flops_per_rank_fall_with_sequence_parallelism_for_1_5_5b_at_81x768x1360():
    """The 1.5 block at its largest clip (45,106 tokens), two layers: each doubling of the group about halves
    what a rank holds and computes (the whole-sample embeddings and loss inputs stay on every rank)."""
    family = get_family("CogVideoX1.5-5b")
    shape = StepShape(family, {**family.full_size_transformer, "num_layers": 2}, 81, 768, 1360, 1, LoraSettings(), 1)
    traces = {parts: trace_step(dataclasses.replace(shape, sequence_parallel=parts)) for parts in (1, 2, 4, 8)}
    for parts in (2, 4, 8):
        smaller, larger = traces[parts], traces[parts // 2]
        assert 0.45 < smaller.activation_peak / larger.activation_peak < 0.6, parts
        assert 0.45 < smaller.flops / larger.flops < 0.55, parts


def test_checkpointing_lowers_activations_and_recomputation_costs_flops():
    every_block, none = trace_step(two_layers("CogVideoX-2b", 1)), trace_step(two_layers("CogVideoX-2b", 0))
    assert every_block.activation_peak < none.activation_peak
    assert every_block.flops > every_block.model_flops == none.model_flops == none.flops


def fixed_trace(frozen: int = 1_000_000_000, lora: int = 50_000_000, activations: int = 4 * GIB) -> StepTrace:
    return StepTrace(activations, flops=10**15, model_flops=7 * 10**14, frozen_parameters=frozen,
                     lora_parameters=lora, largest_block_parameters=frozen // 30, tokens=17_776, seconds=0.0)


def test_zero_stages_partition_what_they_should():
    shape, trace, ranks = full_size("CogVideoX-2b", 1), fixed_trace(), 8
    buffers = DeepSpeedBuffers(reduce_bucket=100_000_000, overlap_comm=True, prefetch_bucket=10_000_000)
    plans = {zero: plan_memory(shape, Strategy(zero), ranks, buffers, trace) for zero in ("zero1", "zero2", "zero3")}
    lora, frozen = trace.lora_parameters, trace.frozen_parameters
    assert plans["zero1"].lora_gradients == lora * 2  # whole bf16 gradients
    assert plans["zero2"].lora_gradients == lora * 4 // ranks  # this rank's fp32 partition
    assert plans["zero1"].optimizer_state == plans["zero2"].optimizer_state == 12 * lora // ranks
    assert plans["zero2"].buffers == 2 * 100_000_000 * 2  # two reduce buckets with overlap_comm, bf16
    assert plans["zero2"].frozen_weights == frozen * 2
    gathered = (2 * trace.largest_block_parameters + 10_000_000) * 2
    assert plans["zero3"].frozen_weights == frozen * 2 // ranks + gathered
    assert plans["zero3"].lora_weights == lora * 2 // ranks
    offloaded = plan_memory(shape, Strategy("zero3", True, True), ranks, buffers, trace)
    assert offloaded.optimizer_state == 0 and offloaded.frozen_weights == gathered
    doubled = plan_memory(shape, Strategy("zero2", micro_batch_size=2), ranks, buffers, trace)
    assert doubled.activations == 2 * plans["zero2"].activations
    averaged = plan_memory(shape, Strategy("zero2"), ranks, buffers, trace, adapter_average=True)
    assert averaged.optimizer_state - plans["zero2"].optimizer_state == 4 * lora // ranks  # train.ema_decay's chunks


def test_zero3_on_one_rank_needs_more_than_zero2():
    """What DiffSynth-Studio#486 saw: ZeRO-3 gathers whole blocks and a prefetch bucket on top of weights it cannot
    partition when there is a single rank."""
    shape, trace = full_size("CogVideoX-5b", 1), fixed_trace()
    zero2, zero3 = (plan_memory(shape, Strategy(zero), 1, None, trace) for zero in ("zero2", "zero3"))
    assert zero3.frozen_weights > zero2.frozen_weights


def test_deepspeed_configs_are_read_as_strategies():
    from cogvx_dist.train.ds_config import load_ds_config

    assert strategy_from_ds_config(load_ds_config("zero3_offload"), 2, 1) == Strategy("zero3", True, True, 2, 1)
    assert strategy_from_ds_config(load_ds_config("zero2_offload"), 1, 1).ds_config_name == "zero2_offload"
    assert buffers_from_ds_config(load_ds_config("zero3")) == DeepSpeedBuffers(200_000_000, True, 50_000_000)


def test_the_frontier_drops_configurations_beaten_on_time_and_memory():
    shape, trace = full_size("CogVideoX-2b", 1), fixed_trace()
    plans = [plan_memory(shape, Strategy(zero), 8, None, trace) for zero in ("zero1", "zero2", "zero3")]
    kept = {plan.strategy.zero for plan in frontier(plans)}
    assert kept == {"zero2", "zero3"}  # zero1 is as fast as zero2 and needs more


@pytest.mark.slow
def test_search_for_1_5_5b_i2v_at_81x768x1360_on_8_gpus_names_what_fits_40_and_24_gb():
    """The case of zai-org/CogVideo#787 (8 x 40 GB A800s)."""
    plans = search(full_size("CogVideoX1.5-5b-I2V", 1, 81, 768, 1360), ranks=8)
    fit_40 = [plan for plan in plans if plan.fits(GPU_CLASSES["40 GB"])]
    fit_24 = [plan for plan in plans if plan.fits(GPU_CLASSES["24 GB"])]
    assert fit_40 and fit_24
    assert all(plan.strategy.gradient_checkpointing == 1 for plan in fit_24)
    assert fit_24[0].strategy.zero == "zero3"
    assert not any(plan.fits(GPU_CLASSES["40 GB"]) for plan in plans if plan.strategy.gradient_checkpointing == 0)


@pytest.mark.slow
def test_the_cheapest_change_for_5b_without_checkpointing_on_40_gb_is_checkpointing():
    config = RunConfig()
    config.model.gradient_checkpointing = 0
    run = run_from_family("CogVideoX-5b", config, 1, (None, None, None))
    assert not run.plan().fits(GPU_CLASSES["40 GB"])
    assert cheapest_change(run, GPU_CLASSES["40 GB"]) == "model.gradient_checkpointing: 1"


def test_the_cheapest_change_is_none_when_nothing_fits():
    run = PlannedRun(two_layers("CogVideoX-2b", 1), Strategy(), DeepSpeedBuffers(), ranks=1, grad_accum_steps=1)
    assert cheapest_change(run, GIB // 2) is None  # less than the CUDA runtime alone
    zero2, zero3 = run.plan().needed, run.plan(Strategy("zero3")).needed
    assert zero3 < zero2  # one reduce bucket instead of two, for a model this small
    assert cheapest_change(run, (zero2 + zero3) // 2) == "deepspeed.config: zero3"
    assert cheapest_change(run, zero2) == "none: it fits as configured"


@pytest.mark.parametrize(("args", "fragments"), [
    (["--family", "CogVideoX-7b"], ["unknown model family 'CogVideoX-7b'"]),
    (["--family", "CogVideoX-2b", "--frames", "50"], ["50 frames is not valid for CogVideoX-2b", "8N+1"]),
    (["--family", "CogVideoX-2b", "--frames", "0"], ["0 frames is not valid for CogVideoX-2b"]),  # not the default
    (["--family", "CogVideoX-2b", "--resolution", "480x721"], ["480x721 is not a positive multiple of 16"]),
    (["--family", "CogVideoX-5b-I2V", "--resolution", "768x1360"], ["learns its positions for 480x720 only"]),
    (["--family", "CogVideoX-2b", "--resolution", "big"], ["--resolution: 'big' is not HEIGHTxWIDTH"]),
    (["--family", "CogVideoX-2b", "--gpu-memory", "lots"], ["--gpu-memory: 'lots' is not a size"]),
    (["--family", "CogVideoX-2b", "lora.rank=0"], ["lora.rank must be a positive integer"]),
    (["--family", "CogVideoX-2b", "deepspeed.config=zero9"], ["deepspeed.config 'zero9': no such file"]),
    (["--family", "CogVideoX-2b", "--nodes", "0"], ["--nodes must be at least 1"]),
    ([], ["give either --config", "not neither"]),
])
def test_bad_plan_inputs_are_one_line_errors(capsys, args, fragments):
    assert_one_line_error(*cli(capsys, "plan", *args)[::2], *fragments)


def test_planning_a_run_config_without_shards_asks_for_the_geometry(capsys, tmp_path, tiny_checkpoint):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tiny_checkpoint()}\ndata:\n  shards: {tmp_path / 'not-yet'}\n")
    assert_one_line_error(*cli(capsys, "plan", "--config", str(config))[::2], "data.shards",
                          "give --frames and --resolution")


def test_plan_of_a_run_config_reports_every_term_and_the_verdict(capsys, synthetic_shards, tmp_path):
    model, shards = synthetic_shards((3, 3))
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {model}\n  dtype: float32\ndata:\n  shards: {shards}\n")
    code, out, _ = cli(capsys, "plan", "--config", str(config), "--gpu-memory", "2GiB", "--json")
    assert code == 0
    report = json.loads(out)
    plan = report["plan"]
    terms = ("frozen_weights", "lora_weights", "lora_gradients", "optimizer_state", "buffers", "activations")
    assert plan["peak"] == sum(plan[term] for term in terms) and plan["needed"] > plan["peak"]
    assert plan["buffers"] == 2 * 200_000_000 * 4  # zero2's two float32 reduce buckets dominate a tiny model
    assert plan["fits"] is False and report["gpu_memory"] == 2 * GIB
    code, out, _ = cli(capsys, "plan", "--config", str(config), "--gpu-memory", "2GiB", "--search",
                       "deepspeed.config=zero3")
    assert code == 0 and "fits, " in out and "best on this GPU: zero3" in out
    code, out, _ = cli(capsys, "plan", "--config", str(config), "--search", "--gpus-per-node", "4", "--nodes", "2",
                       "--json")
    options = json.loads(out)["sequence_parallel"]
    assert list(options) == ["1", "2", "4"]  # groups stay inside a node
    assert options["1"]["activations"] > options["2"]["activations"] > options["4"]["activations"]


def test_the_plan_takes_the_largest_bucket_by_tokens_that_holds_samples(synthetic_shards):
    """Frame buckets x resolutions: the peak is set by the bucket with the most tokens, frames included; where prep
    counted the buckets, one that holds no sample does not count."""
    from cogvx_dist.core.shard_format import Manifest

    _, shards = synthetic_shards((3, 3))
    manifest = Manifest.read(shards)
    listed = dataclasses.replace(manifest, frames=17, frame_counts=[17, 9], buckets=[[32, 48], [64, 64]], stats={})
    assert largest_geometry(listed) == (17, 64, 64)  # not counted: every frame count x resolution listed
    counted = dataclasses.replace(listed, stats={"samples": manifest.num_samples, "buckets": [
        {"frames": 17, "height": 32, "width": 48, "samples": 2},
        {"frames": 17, "height": 64, "width": 64, "samples": 0},
        {"frames": 9, "height": 64, "width": 64, "samples": manifest.num_samples - 2},
        {"frames": 9, "height": 32, "width": 48, "samples": 0}]})
    assert largest_geometry(counted) == (9, 64, 64)  # 3x4x4 patches beat 5x2x3; 17x64x64 holds none
