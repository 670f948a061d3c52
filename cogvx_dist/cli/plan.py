"""`cogvx plan`: before any GPU is touched, what one rank of a run will hold at its peak, whether it fits, how
long a step should take, and (--search) which configuration to run."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

TERM_NAMES = {
    "frozen_weights": "frozen weights",
    "lora_weights": "LoRA weights",
    "lora_gradients": "LoRA gradients",
    "optimizer_state": "optimizer state",
    "buffers": "DeepSpeed buffers",
    "activations": "activations",
}


def configure(plan: argparse.ArgumentParser, name: str = "plan") -> None:
    """Arguments and handler of `cogvx plan`."""
    plan.set_defaults(handler=run)
    what = plan.add_argument_group("what is trained: a run config, or a released family")
    what.add_argument("--config", help="run config (YAML or TOML): model, shards' geometry, DeepSpeed config, "
                                       "checkpointing, micro batch and LoRA")
    what.add_argument("--family", help="a released family at full size (e.g. CogVideoX1.5-5b-I2V), without --config")
    what.add_argument("--frames", type=int, help="frames per clip (default: the shards', or the family's)")
    what.add_argument("--resolution", help="HEIGHTxWIDTH (default: the shards' largest bucket, or the family's)")
    where = plan.add_argument_group("where it runs")
    where.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    where.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: the visible ones, or 1)")
    where.add_argument("--gpu-memory", help="memory of one GPU, e.g. 40GiB or 80GB (default: plan.gpu_memory, or "
                                            "the visible GPU's; without either, common cards are compared)")
    plan.add_argument("--search", action="store_true",
                      help="also weigh every shipped DeepSpeed config, checkpointing and micro batch")
    plan.add_argument("--calibrate", metavar="RUN_DIR",
                      help="estimate step time at the throughput one of your runs reached (its metrics.jsonl)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    plan.add_argument("overrides", nargs="*",
                      help="section.key=value, e.g. deepspeed.config=zero3 model.gradient_checkpointing=0 "
                           "train.micro_batch_size=2 lora.rank=64")


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.train.memory import plan as memory_plan
    from cogvx_dist.train.memory import runs as planned_runs

    planned, memory = _planned_run(args)
    calibration = planned_runs.calibrate(args.calibrate) if args.calibrate else None
    plan = planned.plan()
    searched = memory_plan.search(planned.shape, planned.ranks, planned.buffers) if args.search else []
    per_node = args.gpus_per_node or _visible_gpus()
    sequence = planned.sequence_parallel_options(per_node) if args.search and per_node > 1 else {}
    if args.json:
        print(json.dumps({**_as_json(planned, plan, memory, calibration, searched),
                          "sequence_parallel": {parts: {**p.terms(), "peak": p.peak, "needed": p.needed,
                                                        "flops_per_rank": p.trace.flops}
                                                for parts, p in sequence.items()}}, indent=2))
        return 0
    print(_describe_run(planned, memory))
    print(_describe_plan(plan, memory))
    print(_describe_time(planned, plan, calibration))
    if searched:
        print(_describe_search(searched, memory, calibration))
    if sequence:
        print(_describe_sequence_parallel(sequence, planned.ranks, memory))
    return 0


def _planned_run(args: argparse.Namespace) -> tuple[Any, int | None]:
    """The run to plan and the GPU memory to plan for (None: compare against common cards)."""
    from cogvx_dist.core.config_files import apply_overrides, from_dict, load_config
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.units import parse_size
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.memory import runs as planned_runs

    if bool(args.config) == bool(args.family):
        raise CogvxError("give either --config (a run config) or --family (a released family), not "
                         + ("both" if args.config else "neither"))
    for key, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < (1 if key == "--nodes" else 0):
            raise CogvxError(f"{key} must be at least 1, got {value}")
    ranks = args.nodes * (args.gpus_per_node or _visible_gpus())
    height, width = parse_size(args.resolution, "--resolution") if args.resolution else (None, None)
    if args.config:
        config = load_config(RunConfig, args.config, args.overrides)
        geometry = None
        if args.frames is not None or args.resolution:
            if args.frames is None or not args.resolution:
                raise CogvxError("with --config, give both --frames and --resolution (or neither: the shards')")
            geometry = (args.frames, height, width)

        def make_run(settings: RunConfig) -> Any:
            return planned_runs.run_from_config(settings, ranks, geometry)
    else:
        config = from_dict(RunConfig, apply_overrides({}, args.overrides))
        config.validate_settings()

        def make_run(settings: RunConfig) -> Any:
            return planned_runs.run_from_family(args.family, settings, ranks, (args.frames, height, width))
    memory = planned_runs.gpu_memory(args.gpu_memory or config.plan.gpu_memory, "--gpu-memory", local_rank=0)
    if config.model.gradient_checkpointing == "auto":
        every, why = planned_runs.pick_checkpointing(
            lambda k: make_run(planned_runs.with_checkpointing(config, k)), memory)
        print(why)
        config = planned_runs.with_checkpointing(config, every)
    return make_run(config), memory


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _describe_run(planned: Any, memory: int | None) -> str:
    from cogvx_dist.core.units import gib

    shape, trace = planned.shape, planned.plan().trace
    lora = shape.lora
    gpu = f"{gib(memory)} each" if memory else "no GPU memory given"
    return (f"{shape.family.name}, {shape.frames}x{shape.height}x{shape.width} ({trace.tokens:,} tokens a sample), "
            f"{str(shape.dtype).removeprefix('torch.')} weights ({_scaled(trace.frozen_parameters)} frozen), "
            f"LoRA r={lora.rank} on {','.join(lora.target_modules)} ({_scaled(trace.lora_parameters)})\n"
            f"{planned.ranks} data-parallel rank{'s' if planned.ranks != 1 else ''}, {gpu}; "
            f"{planned.strategy.describe()}")


def _scaled(count: float) -> str:
    """1.33e15 -> '1.33 P', 58982400 -> '58.98 M'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.2f} {prefix}"
    return f"{count:.0f} "


def _describe_plan(plan: Any, memory: int | None) -> str:
    from cogvx_dist.core.units import gib
    from cogvx_dist.train.memory.plan import GPU_CLASSES

    lines = ["", "per rank (every rank alike)"]
    lines += [f"  {TERM_NAMES[name]:<22}{gib(value):>12}" for name, value in plan.terms().items()]
    lines.append(f"  {'= peak allocated':<22}{gib(plan.peak):>12}   (torch.cuda.max_memory_allocated)")
    lines.append(f"  {'+ framework overhead':<22}{gib(plan.overhead):>12}   (CUDA context and allocator slack)")
    lines.append(f"  {'= needed':<22}{gib(plan.needed):>12}")
    if memory:
        margin = memory - plan.needed
        verdict = f"fits, {gib(margin)} to spare" if margin >= 0 else f"does NOT fit: {gib(-margin)} short"
        lines.append(f"  on a GPU of {gib(memory)}: {verdict}")
    else:
        fits = [name for name, size in GPU_CLASSES.items() if plan.fits(size)]
        lines.append("  fits: " + (", ".join(fits) + " cards" if fits else "none of " + ", ".join(GPU_CLASSES)))
    return "\n".join(lines)


def _describe_time(planned: Any, plan: Any, calibration: Any) -> str:
    trace = plan.trace
    samples = plan.strategy.micro_batch_size * planned.grad_accum_steps
    text = (f"\nstep: {_scaled(trace.flops * samples)}FLOP per rank ({_scaled(trace.model_flops * samples)}FLOP "
            f"without recomputation), {trace.tokens * samples // planned.shape.sequence_parallel:,} tokens per rank")
    if calibration is None:
        return text + "; --calibrate RUN_DIR turns this into seconds"
    seconds = plan.seconds_per_step(calibration.tflops_per_gpu, planned.grad_accum_steps)
    throughput = _scaled(calibration.tflops_per_gpu * 1e12)
    return (text + f"\n  ~{seconds:.2f} s a step at {throughput}FLOP/s per GPU (measured on {calibration.run_dir}: "
            f"median step {calibration.step_time_s:.3f} s over {calibration.windows} log windows)")


def _describe_search(plans: list[Any], memory: int | None, calibration: Any) -> str:
    from cogvx_dist.core.units import GIB
    from cogvx_dist.train.memory.plan import GPU_CLASSES, expected_cost, frontier

    sizes = {"fits": memory} if memory else GPU_CLASSES
    fastest = expected_cost(plans[0])
    shown = frontier(plans)
    header = f"{'':2}{'configuration':<58}{'needed':>10}{'time/sample':>13}" + "".join(f"{n:>9}" for n in sizes)
    lines = ["", f"candidates, fastest expected first: time per sample relative to the fastest, * = best that fits "
                 f"({len(plans) - len(shown)} beaten on both time and memory left out)", header]
    best = {name: next((p for p in plans if p.fits(size)), None) for name, size in sizes.items()}
    for plan in shown:
        mark = "*" if any(plan is chosen for chosen in best.values()) else " "
        speed = f"{expected_cost(plan) / fastest:.2f}x"
        if calibration:
            speed = f"{plan.seconds_per_step(calibration.tflops_per_gpu) / plan.strategy.micro_batch_size:.2f} s"
        cells = "".join(f"{'yes' if plan.fits(size) else '-':>9}" for size in sizes.values())
        lines.append(f"{mark} {plan.strategy.describe():<58}{plan.needed / GIB:>6.1f} GiB{speed:>13}{cells}")
    for name, chosen in best.items():
        label = "this GPU" if name == "fits" else name
        lines.append(f"best on {label}: " + (chosen.strategy.describe() if chosen else
                                              "none fits (fewer frames, a smaller resolution or more memory)"))
    return "\n".join(lines)


def _describe_sequence_parallel(options: dict[int, Any], ranks: int, memory: int | None) -> str:
    from cogvx_dist.core.units import GIB
    from cogvx_dist.train.memory.plan import GPU_CLASSES

    sizes = {"fits": memory} if memory else GPU_CLASSES
    lines = ["", "sequence parallelism (parallel.sequence_parallel: ranks of a node sharing each sample's tokens), "
                 "with the configuration above, per rank:",
             f"{'  P':<5}{'data-parallel':>14}{'activations':>13}{'needed':>11}{'FLOP/step':>12}"
             + "".join(f"{n:>9}" for n in sizes)]
    for parts, plan in options.items():
        cells = "".join(f"{'yes' if plan.fits(size) else '-':>9}" for size in sizes.values())
        lines.append(f"{parts:>3}  {ranks // parts:>14}{plan.activations / GIB:>9.1f} GiB{plan.needed / GIB:>7.1f} GiB"
                     f"{_scaled(plan.trace.flops):>11} " + cells)
    return "\n".join(lines)


def _as_json(planned: Any, plan: Any, memory: int | None, calibration: Any, searched: list[Any]) -> dict[str, Any]:
    shape = planned.shape

    def entry(p: Any) -> dict[str, Any]:
        item = {"strategy": p.strategy.describe(), "ds_config": p.strategy.ds_config_name,
                "gradient_checkpointing": p.strategy.gradient_checkpointing,
                "micro_batch_size": p.strategy.micro_batch_size, **p.terms(), "peak": p.peak, "needed": p.needed,
                "fits": p.fits(memory) if memory else None}
        if calibration:
            item["seconds_per_step"] = p.seconds_per_step(calibration.tflops_per_gpu, planned.grad_accum_steps)
        return item

    return {"family": shape.family.name, "frames": shape.frames, "height": shape.height, "width": shape.width,
            "tokens_per_sample": plan.trace.tokens, "ranks": planned.ranks, "gpu_memory": memory,
            "flops_per_sample": plan.trace.flops, "model_flops_per_sample": plan.trace.model_flops,
            "calibration": dataclasses.asdict(calibration) if calibration else None,
            "plan": entry(plan), "search": [entry(p) for p in searched]}
