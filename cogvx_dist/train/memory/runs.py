"""The memory planner applied to a training run (train/memory/plan.py does the arithmetic): the step a run config
trains, the strategy its DeepSpeed config and settings describe and the GPU each rank gets; the pre-flight check,
which names the cheapest change that fits; and a throughput calibrated from a finished run's metrics."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogvx_dist.core.devices import torch_dtype
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import ModelFamily, get_family
from cogvx_dist.core.loading import CheckpointInfo
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.core.units import gib, parse_bytes
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.data.reader import samples_within_budget
from cogvx_dist.train.memory.plan import (
    DeepSpeedBuffers,
    MemoryPlan,
    Strategy,
    buffers_from_ds_config,
    candidates,
    expected_cost,
    plan_memory,
    relative_cost,
    strategy_from_ds_config,
)
from cogvx_dist.train.memory.trace import StepShape

PLAN_CHECKED_ENV = "COGVX_PLAN_CHECKED"
"""Set by `cogvx train` once it has checked the plan, so that rank 0 does not trace the step again."""


@dataclass(frozen=True)
class PlannedRun:
    """What the planner needs to know of a run."""

    shape: StepShape
    strategy: Strategy
    buffers: DeepSpeedBuffers
    ranks: int
    """Data-parallel ranks (ZeRO partitions over them)."""
    grad_accum_steps: int
    adapter_average: bool = False
    """train.ema_decay keeps a sharded fp32 average of the adapter."""

    def plan(self, strategy: Strategy | None = None) -> MemoryPlan:
        """The plan of this run, or of it with another strategy."""
        return plan_memory(self.shape, strategy or self.strategy, self.ranks, self.buffers,
                           adapter_average=self.adapter_average)

    def sequence_parallel_options(self, gpus_per_node: int) -> dict[int, MemoryPlan]:
        """parallel.sequence_parallel -> the plan with it, for each group size that fits in a node (all-to-alls
        across nodes would cost more than they save) and divides the ranks."""
        sizes = [parts for parts in (1, 2, 4, 8, 16) if parts <= gpus_per_node and self.ranks % parts == 0]
        return {parts: plan_memory(dataclasses.replace(self.shape, sequence_parallel=parts), self.strategy,
                                   self.ranks, self.buffers, adapter_average=self.adapter_average)
                for parts in sizes}


def planned_run(config: RunConfig, family: ModelFamily, transformer_config: dict[str, Any],
                geometry: tuple[int, int, int], ds_config: dict[str, Any], ranks: int,
                micro_batch_size: int | None = None) -> PlannedRun:
    """The run as the planner sees it, training clips of `geometry` (frames, height, width) in micro-batches of
    `micro_batch_size` (train.micro_batch_size unless given: a token budget's size for that geometry)."""
    frames, height, width = geometry
    if frames == 1 and not family.single_image_problem():  # single images beside clips (a token budget plans them)
        problem = family.resolution_problem(height, width, transformer_config)
        if problem:
            raise CogvxError(problem)
    else:
        family.check_geometry(*geometry, transformer_config)
    micro, checkpointing = micro_batch_size or config.train.micro_batch_size, config.model.gradient_checkpointing
    shape = StepShape(family, transformer_config, *geometry, micro, config.lora, checkpointing,
                      torch_dtype(config.model.dtype), config.parallel.sequence_parallel)
    return PlannedRun(shape, strategy_from_ds_config(ds_config, checkpointing, micro),
                      buffers_from_ds_config(ds_config), ranks, config.train.grad_accum_steps,
                      adapter_average=config.train.ema_decay > 0)


def bucket_geometries(manifest: Manifest) -> list[tuple[int, int, int]]:
    """(frames, height, width) of the shards' buckets: those that hold samples where the manifest counts them, else
    every frame count x resolution it lists."""
    counted = manifest.bucket_samples()
    return ([bucket for bucket, samples in counted.items() if samples] if counted else
            [(frames, height, width) for frames in manifest.all_frame_counts() for height, width in manifest.sizes()])


def largest_geometry(manifest: Manifest) -> tuple[int, int, int]:
    """(frames, height, width) of the shards' largest bucket by tokens, the one that sets the peak at a fixed
    micro_batch_size (see bucket_geometries for which buckets count)."""
    family = get_family(manifest.family)
    return max(bucket_geometries(manifest), key=lambda bucket: (family.tokens_per_sample(*bucket), bucket))


def planned_batches(config: RunConfig, manifest: Manifest) -> list[tuple[tuple[int, int, int], int]]:
    """(geometry, micro-batch size) of the micro-batches that may set the peak: the largest bucket at
    train.micro_batch_size; under a token budget (train.micro_batch_tokens) every bucket at its own size, since a
    smaller clip's fuller micro-batch may need more than the largest clip alone."""
    budget = config.train.micro_batch_tokens
    if not budget:
        return [(largest_geometry(manifest), config.train.micro_batch_size)]
    family = get_family(manifest.family)
    return [(bucket, samples_within_budget(family.tokens_per_sample(*bucket), budget))
            for bucket in bucket_geometries(manifest)]


def peak_run(config: RunConfig, family: ModelFamily, transformer_config: dict[str, Any], manifest: Manifest,
             ds_config: dict[str, Any], ranks: int) -> PlannedRun:
    """The run as the planner sees it at its worst micro-batch (planned_batches), the one predicted to need the
    most memory."""
    runs = [planned_run(config, family, transformer_config, geometry, ds_config, ranks, micro)
            for geometry, micro in planned_batches(config, manifest)]
    if len(runs) == 1:
        return runs[0]
    return max(runs, key=lambda run: run.plan().needed)


def run_from_config(config: RunConfig, ranks: int, geometry: tuple[int, int, int] | None = None) -> PlannedRun:
    """A run config as the planner sees it: its model's transformer config, its DeepSpeed config, and the geometry
    of its shards unless given (planning before prep)."""
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.train.ds_config import load_ds_config

    checkpoint = describe_checkpoint(config.model.path)
    if geometry is None:
        try:
            manifest = read_manifest(config)
        except CogvxError as err:
            raise CogvxError(f"data.shards: {err}; to plan before prep, give --frames and --resolution") from err
        return peak_run(config, checkpoint.family, checkpoint.transformer_config, manifest,
                        load_ds_config(config.deepspeed.config), ranks)
    return planned_run(config, checkpoint.family, checkpoint.transformer_config, geometry,
                       load_ds_config(config.deepspeed.config), ranks)


def run_from_family(family_name: str, config: RunConfig, ranks: int,
                    geometry: tuple[int | None, int | None, int | None]) -> PlannedRun:
    """A full-size released family (its transformer config from the family table) trained with `config`'s
    settings; missing parts of `geometry` are the family's native ones."""
    from cogvx_dist.train.ds_config import load_ds_config

    family = get_family(family_name)
    frames, height, width = geometry
    native = (family.default_frames if frames is None else frames, family.default_height if height is None else height,
              family.default_width if width is None else width)
    return planned_run(config, family, family.full_size_transformer, native,
                       load_ds_config(config.deepspeed.config), ranks)


def read_manifest(config: RunConfig) -> Manifest:
    """The manifest of the run's shards (local, remote or streamed), or the one standing for its mixture."""
    from cogvx_dist.core.storage import Store
    from cogvx_dist.train.data.mixture import combined_manifest
    from cogvx_dist.train.data.streaming import read_remote_manifest

    if config.data.streaming:
        return read_remote_manifest(config.data.shards)
    locations = [source.shards for source in config.data.sources] or [config.data.shards]
    return combined_manifest([Manifest.read(location, Store(location, config.data.storage_options))
                              for location in locations])


def gpu_memory(setting: str, key: str, local_rank: int | None) -> int | None:
    """Bytes of one rank's GPU: the setting if given, else (with a local rank) the visible GPU's total, else None.
    Without a local rank CUDA stays untouched: `cogvx train` must not hold a CUDA context beside its ranks."""
    if setting:
        return parse_bytes(setting, key)
    if local_rank is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory


CHECKPOINTING_BY_RECOMPUTE = (0, 8, 4, 3, 2, 1)
"""gradient_checkpointing values from the least recomputation to the most (every k-th block is recomputed)."""


def least_recompute_that_fits(needed: dict[int, int], memory: int) -> int | None:
    """The gradient_checkpointing value with the least recomputation whose predicted need fits `memory`."""
    return next((every for every in CHECKPOINTING_BY_RECOMPUTE if every in needed and needed[every] <= memory), None)


def with_checkpointing(config: RunConfig, every: int) -> RunConfig:
    """`config` with model.gradient_checkpointing set to `every`."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=every))


def pick_checkpointing(make_run: Callable[[int], PlannedRun], memory: int | None) -> tuple[int, str]:
    """(gradient_checkpointing, why) for "auto": the least recomputation whose plan (`make_run(every)`) fits
    `memory`; every block where the memory is unknown or nothing fits (the memory check then says what would)."""
    if memory is None:
        return 1, "gradient checkpointing auto: every block (no GPU memory to plan against: no GPU, no plan.gpu_memory)"
    needed = {every: make_run(every).plan().needed for every in CHECKPOINTING_BY_RECOMPUTE}
    chosen = least_recompute_that_fits(needed, memory)
    if chosen is None:
        return 1, (f"gradient checkpointing auto: every block, and even that is predicted to need ~{gib(needed[1])} "
                   f"of {gib(memory)}")
    what = "none" if chosen == 0 else "every block" if chosen == 1 else f"every {chosen}th block"
    return chosen, (f"gradient checkpointing auto: {what} (the least recomputation predicted to fit: "
                    f"~{gib(needed[chosen])} of {gib(memory)})")


def resolve_checkpointing(config: RunConfig, checkpoint: CheckpointInfo, manifest: Manifest,
                          ds_config: dict[str, Any], ranks: int, local_rank: int | None) -> tuple[RunConfig, str]:
    """`config` with model.gradient_checkpointing "auto" made a number for this rank's GPU, and why; other values
    pass through."""
    if config.model.gradient_checkpointing != "auto":
        return config, ""
    memory = gpu_memory(config.plan.gpu_memory, "plan.gpu_memory", local_rank)
    every, why = pick_checkpointing(
        lambda k: peak_run(with_checkpointing(config, k), checkpoint.family, checkpoint.transformer_config, manifest,
                           ds_config, ranks), memory)
    return with_checkpointing(config, every), why


def check_run_memory(config: RunConfig, checkpoint: CheckpointInfo, manifest: Manifest, ds_config: dict[str, Any],
                     ranks: int, local_rank: int | None) -> str | None:
    """The pre-flight memory check: a line for the log when the run fits, CogvxError when it does not, None when
    there is nothing to check against (plan.check off, or no GPU and no plan.gpu_memory)."""
    if not config.plan.check:
        return None
    memory = gpu_memory(config.plan.gpu_memory, "plan.gpu_memory", local_rank)
    if memory is None:
        return None
    run = peak_run(config, checkpoint.family, checkpoint.transformer_config, manifest, ds_config, ranks)
    plan = run.plan()
    if not plan.fits(memory):
        raise CogvxError(refusal(run, plan, memory))
    return (f"memory plan: each rank needs ~{gib(plan.needed)} of its GPU's {gib(memory)} "
            f"({plan.strategy.describe()}, {ranks} ranks)")


def refusal(run: PlannedRun, plan: MemoryPlan, memory: int) -> str:
    """The one-line refusal: predicted need, the GPU's memory, and the cheapest change that fits."""
    change = cheapest_change(run, memory)
    advice = (f"the cheapest change that fits is {change}" if change else
              "nothing the planner varies fits (every shipped DeepSpeed config, checkpointing, smaller micro "
              "batches): train fewer frames or a smaller resolution, or use GPUs with more memory")
    return (f"memory plan: each rank needs ~{gib(plan.needed)} (peak allocated {gib(plan.peak)}, of which "
            f"activations {gib(plan.activations)}) but its GPU has {gib(memory)}; {advice} (`cogvx plan --search` "
            "lists the options; plan.check: false or --no-plan-check skips this check)")


def cheapest_change(run: PlannedRun, memory: int) -> str | None:
    """The smallest change of the run config that fits, as config keys: the fewest keys changed, the fastest
    expected first, and the best of another kind of change beside it ("A or B")."""
    micro = run.strategy.micro_batch_size
    smaller = tuple(size for size in range(1, micro + 1) if micro % size == 0)
    fitting = [plan for plan in (run.plan(strategy) for strategy in candidates(smaller)) if plan.fits(memory)]
    if not fitting:
        return None
    options = sorted(((config_changes(run, plan.strategy), plan) for plan in fitting),
                     key=lambda option: (len(option[0]), expected_cost(option[1]), option[1].needed))
    fewest = len(options[0][0])
    if fewest == 0:
        return "none: it fits as configured"
    best_per_kind: dict[tuple[str, ...], list[str]] = {}
    for changes, _ in options:
        kind = tuple(change.split(":")[0] for change in changes)
        if len(changes) == fewest and kind not in best_per_kind:
            best_per_kind[kind] = changes
    return " or ".join(", ".join(changes) for changes in list(best_per_kind.values())[:2])


def config_changes(run: PlannedRun, strategy: Strategy) -> list[str]:
    """`strategy` as the run-config keys that differ from the run's own."""
    current = run.strategy
    changes = []
    if (strategy.zero, strategy.offload_optimizer, strategy.offload_params) != (
            current.zero, current.offload_optimizer, current.offload_params):
        changes.append(f"deepspeed.config: {strategy.ds_config_name}")
    if strategy.gradient_checkpointing != current.gradient_checkpointing:
        changes.append(f"model.gradient_checkpointing: {strategy.gradient_checkpointing}")
    if strategy.micro_batch_size != current.micro_batch_size:
        accumulation = run.grad_accum_steps * current.micro_batch_size // strategy.micro_batch_size
        changes.append(f"train.micro_batch_size: {strategy.micro_batch_size} with train.grad_accum_steps: "
                       f"{accumulation}")
    return changes


@dataclass(frozen=True)
class Calibration:
    """A GPU's effective throughput, measured on one of the user's runs."""

    tflops_per_gpu: float
    """Traced step FLOPs (with recomputation, weighted by relative_cost) per second of measured step time."""
    step_time_s: float
    """The run's median step time (log windows after the first, which holds the warm-up)."""
    windows: int
    """Log windows the median was taken over."""
    run_dir: str


def calibrate(run_dir: str | Path) -> Calibration:
    """Throughput from a run folder: its resolved config and DeepSpeed config, its metrics, and a trace of its step
    (its model and shards must still be where the config says)."""
    from cogvx_dist.core.config_files import from_dict
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.core.metric_table import read_metrics
    from cogvx_dist.core.run_folder import RunFolder

    folder = RunFolder(run_dir)
    if not (folder.run_config.is_file() and folder.ds_config.is_file()):
        raise CogvxError(f"--calibrate {run_dir}: not a training run folder (no {folder.run_config.name} and "
                         f"{folder.ds_config.name})")
    config = from_dict(RunConfig, json.loads(folder.run_config.read_text()))
    times = [record["step_time_s"] for record in read_metrics(run_dir) if record.get("step_time_s")]
    if not times:
        raise CogvxError(f"--calibrate {run_dir}: the run has logged no step yet ({folder.metrics})")
    times = times[1:] or times
    checkpoint = describe_checkpoint(config.model.path)
    run = planned_run(config, checkpoint.family, checkpoint.transformer_config, largest_geometry(read_manifest(config)),
                      json.loads(folder.ds_config.read_text()), ranks=1)
    step_time = statistics.median(times)
    work = run.plan().trace.flops * run.strategy.micro_batch_size * run.grad_accum_steps * relative_cost(
        run.strategy)
    return Calibration(work / step_time / 1e12, step_time, len(times), str(run_dir))
