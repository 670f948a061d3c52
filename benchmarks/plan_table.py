"""docs/MEMORY.md: the memory planner's predictions for every released family at its native geometry on 24, 40, 80
and 141 GB GPUs, its accuracy against the H200 measurements, and the configurations users reported running out of
memory with.

    python benchmarks/plan_table.py                  # rewrite docs/MEMORY.md (minutes: a trace per case)
    python benchmarks/plan_table.py --out /tmp/m.md  # somewhere else

Everything comes from `cogvx plan`'s own functions (cogvx_dist/train/memory/plan.py): one fake-tensor trace per
family, geometry and checkpointing setting, on the CPU. The only measured figures are the H200 reference peaks it
compares with (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cogvx_dist.core.families import FAMILIES, get_family  # noqa: E402
from cogvx_dist.core.lora import LoraSettings  # noqa: E402
from cogvx_dist.core.units import GIB  # noqa: E402
from cogvx_dist.train.memory.plan import GPU_CLASSES, H200_MEASURED_PEAKS_GIB, MemoryPlan, Strategy, plan_memory, search  # noqa: E402
from cogvx_dist.train.memory.trace import StepShape, cached_trace  # noqa: E402

REPORTED = [
    # (where, what they ran, family, frames, height, width, ranks, their GPU, strategy as they ran it, likely cause)
    ("zai-org/CogVideo#787", "official trainer, DDP, 8 x A800 40 GB", "CogVideoX1.5-5b-I2V", 81, 768, 1360, 8,
     "40 GB", "none", "the transformer step fits with checkpointing; the official trainer also encodes the videos "
     "with the VAE on the training GPUs, whose peak at 768x1360 is far above it (zai-org/CogVideo#471: up to "
     "68 GB without tiling). cogvx encodes in the prep tier, never beside the transformer"),
    ("zai-org/CogVideo#575", "diffusers example, accelerate multi-GPU, r=128, 512x512 (GPU not given: 24 GB "
     "shown)", "CogVideoX-5b", 49, 512, 512, 2, "24 GB", "none", "fits only with --gradient_checkpointing; the "
     "example also keeps T5 and the VAE on the GPU for validation"),
    ("huggingface/finetrainers#273", "2 x 32 GB, wants 24 GB (geometry not given)", "CogVideoX-5b", 49, 480, 720,
     2, "24 GB", "none", "fits a 24 GB card with checkpointing at 49x480x720, not without"),
    ("modelscope/DiffSynth-Studio#486", "a higher DeepSpeed stage raised memory", "CogVideoX-5b", 49, 480, 720,
     1, "24 GB", "zero3", "on one rank ZeRO-3 partitions nothing yet gathers whole blocks and a prefetch "
     "bucket: more than ZeRO-1/2 (the column before)"),
]


def shape(family_name: str, frames: int, height: int, width: int, checkpointing: int = 1) -> StepShape:
    family = get_family(family_name)
    return StepShape(family, family.full_size_transformer, frames, height, width, 1, LoraSettings(), checkpointing)


def native(family_name: str) -> tuple[int, int, int]:
    family = get_family(family_name)
    return family.default_frames, family.default_height, family.default_width


def accuracy_rows() -> list[str]:
    rows = ["| family | checkpointing | optimizer | predicted GiB | measured GiB | error |",
            "|---|---|---|---|---|---|"]
    for family, checkpointing, zero, measured in H200_MEASURED_PEAKS_GIB:
        strategy = Strategy(zero, gradient_checkpointing=checkpointing)
        plan = plan_memory(shape(family, 49, 480, 720, checkpointing), strategy, 1)
        optimizer = "torch AdamW, no DeepSpeed" if zero == "none" else f"DeepSpeed {zero}, 1 rank"
        rows.append(f"| {family} | {'every block' if checkpointing else 'off'} | {optimizer} | {plan.peak / GIB:.2f} | "
                    f"{measured:.1f} | {plan.peak / GIB / measured - 1:+.1%} |")
    return rows


def best_cell(plans: list[MemoryPlan], memory: int) -> str:
    chosen = next((plan for plan in plans if plan.fits(memory)), None)
    if chosen is None:
        return "nothing fits"
    return f"{chosen.strategy.describe()} ({chosen.needed / GIB:.1f} GiB)"


def family_rows(ranks: int) -> list[str]:
    header = "| family | geometry | tokens | activations, checkpointing every block |"
    rows = [header + "".join(f" {name} |" for name in GPU_CLASSES), "|---" * (4 + len(GPU_CLASSES)) + "|"]
    for name in FAMILIES:
        frames, height, width = native(name)
        plans = search(shape(name, frames, height, width), ranks)
        trace = cached_trace(shape(name, frames, height, width))
        cells = "".join(f" {best_cell(plans, memory)} |" for memory in GPU_CLASSES.values())
        rows.append(f"| {name} | {frames}x{height}x{width} | {trace.tokens:,} | "
                    f"{trace.activation_peak / GIB:.2f} GiB |{cells}")
    return rows


def reported_rows() -> list[str]:
    rows = ["| report | what ran | family, geometry, ranks | need as they ran it | best that fits their GPU here | "
            "likely cause |", "|---|---|---|---|---|---|"]
    for where, what, family, frames, height, width, ranks, gpu, zero, cause in REPORTED:
        needs = [plan_memory(shape(family, frames, height, width, every), Strategy(zero, gradient_checkpointing=every),
                             ranks).needed / GIB for every in (1, 0)]
        label = "plain AdamW (DDP)" if zero == "none" else zero
        best = best_cell(search(shape(family, frames, height, width), ranks), GPU_CLASSES[gpu])
        rows.append(f"| {where} | {what} | {family} {frames}x{height}x{width}, {ranks} rank{'s' * (ranks > 1)} | "
                    f"{label}: {needs[0]:.1f} GiB with checkpointing, {needs[1]:.1f} GiB without | {gpu}: {best} | "
                    f"{cause} |")
    return rows


def page() -> str:
    sections = [
        "# Memory: what fits where",
        "",
        "Generated by `python benchmarks/plan_table.py` from the planner behind `cogvx plan` (cogvx_dist/train/"
        "memory/plan.py). Every figure is a prediction of one rank's need: `torch.cuda.max_memory_allocated` at the "
        "peak of a training step (frozen weights, LoRA weights, gradients and optimizer state as the ZeRO stage "
        "partitions them, DeepSpeed's buckets, and activations traced from one real step of the diffusers "
        "transformer under fake tensors) plus 0.75 GiB for the CUDA context and 5% allocator slack. LoRA r=128 on "
        "to_q, to_k, to_v, to_out.0, bf16 weights, micro batch 1 unless a cell says otherwise. Cards: "
        + ", ".join(f"{name} = {size / GIB:.1f} GiB" for name, size in GPU_CLASSES.items())
        + " (what the driver reports for an RTX 4090, A100 40GB, H100 80GB and H200).",
        "",
        "Run `cogvx plan --config run.yaml --search` (or `--family NAME --frames F --resolution HxW`) for your own "
        "configuration; `cogvx train` runs the same check before any rank loads weights.",
        "",
        "## Accuracy against an H200",
        "",
        "A diffusers-example-style bf16 LoRA step at 49x480x720 on one H200 (docs/BENCHMARKS.md); the "
        "prediction is the peak allocated, without the runtime overhead.",
        "",
        *accuracy_rows(),
        "",
        "## Each family at its native geometry: the fastest configuration that fits",
        "",
        "Expected speed orders the candidates (traced FLOPs with recomputation; ZeRO-3 +10%, optimizer offload +20%, "
        "parameter offload +60%, +5% per doubling of the micro batch: rough factors, not measurements).",
        "",
        "### One GPU", "", *family_rows(1), "",
        "### Eight GPUs (ZeRO partitions over 8 ranks)", "", *family_rows(8), "",
        "## Reported out-of-memory cases",
        "",
        "The configurations users reported running out of memory with, as close as the planner models them "
        "(their trainers add what this project keeps out of training: the VAE and T5 on the GPU, validation runs).",
        "",
        *reported_rows(),
    ]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "MEMORY.md"), help="where to write the page")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    Path(args.out).write_text(page())
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
