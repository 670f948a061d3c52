"""The memory planner: what one rank of a run will hold at its peak, before any GPU is touched, and which
configuration to run.

Per rank, the peak the CUDA caching allocator reports (`torch.cuda.max_memory_allocated`) is the sum of:
- frozen weights: the transformer's frozen parameter count (from its config) times the compute dtype's bytes;
  ZeRO-3 partitions them over the data-parallel ranks and gathers one block (and a prefetch bucket) at a time;
- LoRA weights in the module: LoRA parameters times the compute dtype's bytes (ZeRO-3: partitioned);
- LoRA gradients: the compute-dtype gradients for the whole adapter (no DeepSpeed, ZeRO-1), or, from ZeRO-2 on,
  only this rank's fp32 partition;
- optimizer state: AdamW's two moments, and with DeepSpeed an fp32 master copy: 4 + 4 + 4 bytes a parameter
  over the ranks for ZeRO-1/2/3 (on the CPU with optimizer offload); without DeepSpeed torch's AdamW keeps two
  moments in the parameters' dtype; with train.ema_decay the adapter's fp32 average, 4 bytes a parameter over the
  ranks at every stage (train/ema.py), on the GPU;
- DeepSpeed buffers, from the DeepSpeed config: the gradient reduce bucket (two with overlap_comm) in the compute
  dtype for ZeRO-1/2, one for ZeRO-3, and ZeRO-3's prefetch bucket;
- activations: measured by tracing one real step under fake tensors (train/memory/trace.py), times the micro
  batch.
On top of that the GPU needs a CUDA context and the allocator's slack, which max_memory_allocated does not show:
RUNTIME_OVERHEAD_BYTES plus ALLOCATOR_SLACK of the peak (general PyTorch experience, not a measurement here); a
configuration fits when peak + overhead stays within the GPU's memory.

Checked against peaks measured on one H200 (docs/BENCHMARKS.md; tests/unit/test_memory_plan.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cogvx_dist.core.units import GIB
from cogvx_dist.train.memory.trace import StepShape, StepTrace, cached_trace

RUNTIME_OVERHEAD_BYTES = int(0.75 * GIB)
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: outside max_memory_allocated."""
ALLOCATOR_SLACK = 0.05
"""Fragmentation of the caching allocator, as a share of the allocated peak."""
GPU_CLASSES = {
    "24 GB": 24_564 * 2**20,
    "40 GB": 40_536 * 2**20,
    "80 GB": 81_559 * 2**20,
    "141 GB": 143_771 * 2**20,
}
"""Usable memory of common cards as the driver reports it (RTX 4090, A100 40GB, H100 80GB, H200), for comparing
against when no GPU memory is given."""
H200_MEASURED_PEAKS_GIB = [
    ("CogVideoX-2b", 1, "none", 7.0),
    ("CogVideoX-2b", 0, "none", 31.8),
    ("CogVideoX-2b", 1, "zero2", 8.3),
    ("CogVideoX-5b", 1, "none", 17.7),
    ("CogVideoX-5b", 0, "none", 73.2),
]
"""(family, gradient checkpointing, strategy, GiB): torch.cuda.max_memory_allocated of a diffusers-example-style
bf16 LoRA step (PEFT r=128 on to_q/to_k/to_v/to_out.0, AdamW, batch 1, 49x480x720) on one H200, as docs/BENCHMARKS.md
records it: what the planner is checked against (tests/unit/test_memory_plan.py, docs/MEMORY.md)."""


@dataclass(frozen=True)
class Strategy:
    """How a run spreads and saves memory: the knobs the planner varies."""

    zero: str = "zero2"
    """none (plain torch AdamW in the weights' dtype, no DeepSpeed: the diffusers example), zero1, zero2, zero3."""
    offload_optimizer: bool = False
    """Optimizer state on the CPU (DeepSpeed offload_optimizer)."""
    offload_params: bool = False
    """Frozen and LoRA weights on the CPU between uses (ZeRO-3 offload_param)."""
    gradient_checkpointing: int = 1
    """Recompute every k-th block (1: all, 0: none)."""
    micro_batch_size: int = 1

    @property
    def ds_config_name(self) -> str | None:
        """The shipped DeepSpeed config (ds_configs/) this strategy is, if any."""
        for name, strategy in NAMED_CONFIGS.items():
            if (strategy.zero, strategy.offload_optimizer, strategy.offload_params) == (
                    self.zero, self.offload_optimizer, self.offload_params):
                return name
        return None

    def describe(self) -> str:
        checkpointing = {0: "no checkpointing", 1: "checkpointing every block"}.get(
            self.gradient_checkpointing, f"checkpointing every {self.gradient_checkpointing} blocks")
        return f"{self.ds_config_name or self.zero}, {checkpointing}, micro batch {self.micro_batch_size}"


NAMED_CONFIGS = {
    "zero2": Strategy("zero2"),
    "zero1": Strategy("zero1"),
    "zero2_offload": Strategy("zero2", offload_optimizer=True),
    "zero3": Strategy("zero3"),
    "zero3_offload": Strategy("zero3", offload_optimizer=True, offload_params=True),
}
"""What the shipped ds_configs/ do, in the planner's terms."""


@dataclass(frozen=True)
class DeepSpeedBuffers:
    """Bucket sizes (elements) from the DeepSpeed config."""

    reduce_bucket: int = 200_000_000
    overlap_comm: bool = True
    prefetch_bucket: int = 50_000_000


@dataclass
class MemoryPlan:
    """Predicted peak bytes of one rank, by term."""

    strategy: Strategy
    ranks: int
    frozen_weights: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    buffers: int
    activations: int
    trace: StepTrace = field(repr=False)

    @property
    def peak(self) -> int:
        """What torch.cuda.max_memory_allocated would report."""
        return (self.frozen_weights + self.lora_weights + self.lora_gradients + self.optimizer_state + self.buffers
                + self.activations)

    @property
    def overhead(self) -> int:
        """The CUDA runtime and the allocator's slack: outside max_memory_allocated."""
        return self.needed - self.peak

    @property
    def needed(self) -> int:
        """What the GPU must have: the peak, the allocator's slack and the CUDA runtime."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + RUNTIME_OVERHEAD_BYTES

    def fits(self, gpu_memory: int) -> bool:
        return self.needed <= gpu_memory

    def terms(self) -> dict[str, int]:
        names = ("frozen_weights", "lora_weights", "lora_gradients", "optimizer_state", "buffers", "activations")
        return {name: getattr(self, name) for name in names}

    def seconds_per_step(self, tflops_per_gpu: float, grad_accum_steps: int = 1) -> float:
        """Estimated step time at a calibrated throughput (recomputation included, offload and ZeRO-3 gathers as
        the penalties in relative_cost)."""
        return grad_accum_steps * self.trace.flops * self.strategy.micro_batch_size * relative_cost(
            self.strategy) / (tflops_per_gpu * 1e12)


def relative_cost(strategy: Strategy) -> float:
    """Slowdown factors besides FLOPs (orders candidates; rough and documented, not measured here): ZeRO-3 gathers
    weights every block (+10%), optimizer offload moves the update to the CPU (+20%), parameter offload streams
    every weight over PCIe (+60%)."""
    cost = 1.0
    if strategy.zero == "zero3":
        cost *= 1.10
    if strategy.offload_optimizer:
        cost *= 1.20
    if strategy.offload_params:
        cost *= 1.60
    return cost


def plan_memory(shape: StepShape, strategy: Strategy, ranks: int, buffers: DeepSpeedBuffers | None = None,
                trace: StepTrace | None = None, adapter_average: bool = False) -> MemoryPlan:
    """The predicted per-rank peak of `shape` trained with `strategy` on `ranks` data-parallel ranks (and, with
    `adapter_average`, the sharded EMA of the adapter)."""
    buffers = buffers or DeepSpeedBuffers()
    shape = dataclasses.replace(shape, gradient_checkpointing=strategy.gradient_checkpointing, micro_batch_size=1)
    trace = trace or cached_trace(shape)
    width = shape.dtype.itemsize
    frozen, lora = trace.frozen_parameters, trace.lora_parameters
    zero = strategy.zero
    if zero == "zero3":
        frozen_bytes = frozen * width // ranks + (2 * trace.largest_block_parameters + buffers.prefetch_bucket) * width
        lora_bytes = lora * width // ranks
    else:
        frozen_bytes, lora_bytes = frozen * width, lora * width
    if strategy.offload_params:
        frozen_bytes = (2 * trace.largest_block_parameters + buffers.prefetch_bucket) * width
        lora_bytes = 0
    if zero == "none":
        gradients, optimizer = lora * width, 2 * lora * width
        bucket_bytes = 0
    elif zero == "zero0":  # DeepSpeed's bf16 optimizer without ZeRO: nothing partitioned, no reduce buckets
        gradients, optimizer, bucket_bytes = lora * width, 12 * lora, 0
    else:
        gradients = lora * width if zero == "zero1" else lora * 4 // ranks
        optimizer = 0 if strategy.offload_optimizer else 12 * lora // ranks
        buckets = 1 if zero == "zero3" or not buffers.overlap_comm else 2
        # DeepSpeed allocates each reduce bucket at the configured size, however few LoRA elements there are.
        bucket_bytes = buckets * buffers.reduce_bucket * width
    if adapter_average:
        optimizer += 4 * lora // ranks
    return MemoryPlan(strategy, ranks, frozen_bytes, lora_bytes, gradients, optimizer, bucket_bytes,
                      trace.activation_peak * strategy.micro_batch_size, trace)


def candidates(micro_batches: tuple[int, ...] = (1, 2)) -> list[Strategy]:
    """The configurations `cogvx plan --search` weighs: every shipped DeepSpeed config, checkpointing off, every
    second block or every block, and each micro batch."""
    return [dataclasses.replace(named, gradient_checkpointing=checkpointing, micro_batch_size=micro)
            for named in NAMED_CONFIGS.values() for checkpointing in (0, 2, 1) for micro in micro_batches]


def search(shape: StepShape, ranks: int, buffers: DeepSpeedBuffers | None = None,
           strategies: list[Strategy] | None = None) -> list[MemoryPlan]:
    """Plans for every candidate, fastest expected first (FLOPs with recomputation, times relative_cost, per
    sample), smaller need first among equals; one trace per checkpointing setting."""
    plans = [plan_memory(shape, strategy, ranks, buffers) for strategy in strategies or candidates()]
    return sorted(plans, key=lambda plan: (expected_cost(plan), plan.needed))


def frontier(plans: list[MemoryPlan]) -> list[MemoryPlan]:
    """The plans no other plan beats on both expected time and memory needed, in the given order."""
    return [plan for plan in plans if not any(
        (expected_cost(other), other.needed) < (expected_cost(plan), plan.needed)
        and expected_cost(other) <= expected_cost(plan) and other.needed <= plan.needed for other in plans)]


def expected_cost(plan: MemoryPlan) -> float:
    """Relative time per sample, for ordering candidates."""
    return plan.trace.flops * relative_cost(plan.strategy) / _batch_efficiency(plan.strategy)


def _batch_efficiency(strategy: Strategy) -> float:
    """Larger micro batches use the GPU a little better (rough: +5% per doubling)."""
    return 1.0 + 0.05 * (strategy.micro_batch_size.bit_length() - 1)


def buffers_from_ds_config(config: dict[str, Any]) -> DeepSpeedBuffers:
    """Bucket sizes of a (resolved) DeepSpeed config."""
    zero = config.get("zero_optimization", {})
    return DeepSpeedBuffers(int(float(zero.get("reduce_bucket_size", 2e8))), bool(zero.get("overlap_comm", True)),
                            int(float(zero.get("stage3_prefetch_bucket_size", 5e7))))


def strategy_from_ds_config(config: dict[str, Any], gradient_checkpointing: int, micro_batch_size: int) -> Strategy:
    """The strategy a (resolved) DeepSpeed config and run settings describe."""
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    return Strategy(f"zero{stage}" if stage else "zero0", "offload_optimizer" in zero, "offload_param" in zero,
                    gradient_checkpointing, micro_batch_size)
