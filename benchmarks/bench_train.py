"""Training throughput: seconds per step, tokens/s and peak memory of the real `cogvx train`.

    python benchmarks/bench_train.py                              # tiny 2b checkpoint on CPU (smoke; CPU numbers)
    python benchmarks/bench_train.py --full-size --json r.json    # CUDA: full-size 2b transformer, random weights,
                                                                  # 49x480x720 latents (17,776 tokens), 1 rank
    python benchmarks/bench_train.py --full-size --family CogVideoX-5b
    python benchmarks/bench_train.py --mixed-buckets --json r.json   # 2 frame x 2 resolution buckets against one
                                                                  # bucket of the same tokens (micro-batches of 2)

It writes a training-only checkpoint (transformer + scheduler; full-size configs from the family table, random
weights) or a tiny one, synthetic latent shards of the model's geometry, and a run config with the default LoRA
(r=128, alpha=64 on to_q/to_k/to_v/to_out.0), gradient checkpointing and a DeepSpeed ZeRO config; then it launches
`cogvx train` as a user would and reads `metrics.jsonl`: step_time_s per step, the first --warmup steps left out.

Reference, measured on one H200 with a diffusers-example-style loop (same LoRA, bf16, batch 1, 49x480x720;
docs/BENCHMARKS.md): 2b with checkpointing under DeepSpeed ZeRO-2 on one rank 1.303 s/step and 8.3 GiB (1.271 s and
7.0 GiB without DeepSpeed); 5b with checkpointing 3.385 s/step and 17.7 GiB. With --full-size the report divides
this run's step time by the reference's (vs_reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = {
    "CogVideoX-2b": {"s_per_step": 1.303, "peak_gib": 8.3, "case": "diffusers-style loop, ZeRO-2 single rank"},
    "CogVideoX-5b": {"s_per_step": 3.385, "peak_gib": 17.7, "case": "diffusers-style loop, no DeepSpeed"},
}
"""H200 figures of a diffusers-example-style loop doing the same work, with gradient checkpointing
(docs/BENCHMARKS.md; tests/unit/test_benchmarks.py holds them to its table)."""


def write_train_checkpoint(out: Path, family_name: str, device: str, num_layers: int | None = None) -> Path:
    """A diffusers folder holding what training ranks read (model_index.json, transformer/, scheduler/): the
    family's released transformer config with random bf16 weights (built on `device`, which is fast on a GPU)."""
    import diffusers
    import torch
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from cogvx_dist.core.families import get_family

    family = get_family(family_name)
    config = dict(family.full_size_transformer)
    if num_layers:
        config["num_layers"] = num_layers
    torch.manual_seed(0)
    with torch.device(device):
        transformer = CogVideoXTransformer3DModel(**config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    del transformer
    CogVideoXDPMScheduler(**family.scheduler_config()).save_pretrained(out / "scheduler")
    index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
             "scheduler": ["diffusers", "CogVideoXDPMScheduler"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_ds_config(out: Path, name: str, torch_adam: bool | None) -> Path:
    """A copy of ds_configs/NAME.json with the optimizer implementation chosen (None: the shipped "auto", torch's
    fused AdamW on GPUs; False: DeepSpeed's FusedAdam, which JIT-builds a CUDA op first)."""
    source = REPO / "ds_configs" / f"{name}.json"
    if not source.is_file():
        names = ", ".join(sorted(p.stem for p in source.parent.glob("*.json")))
        raise SystemExit(f"--zero {name}: no ds_configs/{name}.json; one of {names}")
    config = json.loads(source.read_text())
    if torch_adam is not None:
        config["optimizer"]["params"]["torch_adam"] = torch_adam
    out.write_text(json.dumps(config, indent=2) + "\n")
    return out


def bench(args: argparse.Namespace) -> dict:
    import torch
    import yaml

    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.families import get_family
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.core.lora import LoraSettings
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards
    from cogvx_dist.core.tiny import make_tiny_checkpoint

    cuda = torch.cuda.is_available()
    if args.full_size and not cuda:
        raise SystemExit("--full-size needs a CUDA device (the tiny mode runs on CPU)")
    try:
        get_family(args.family)
    except CogvxError as err:
        raise SystemExit(f"--family: {err}") from None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    ds_config = write_ds_config(work / "ds.json", args.zero, args.torch_adam)  # before the slow part: --zero checked
    t0 = time.perf_counter()
    model = work / "model"
    if args.reuse_model and (model / "model_index.json").is_file():
        pass  # the previous case's checkpoint: writing a full-size one again costs tens of seconds
    elif args.full_size:
        model = write_train_checkpoint(model, args.family, "cuda", args.num_layers)
    else:
        model = make_tiny_checkpoint(model, args.family, overwrite=True)
    setup_s = time.perf_counter() - t0
    info = describe_checkpoint(model)
    geometries = [parse_geometry(text) for text in args.geometries.split(",")] if args.geometries else None
    shards = work / (f"shards-{args.case}" if geometries else "shards")
    if not (args.reuse_model and (shards / "manifest.json").is_file()):
        write_synthetic_shards(shards, model, [args.samples], geometries=geometries)
    # Full size: the trainer's defaults (r=128, alpha=64); tiny: r=8, as wide as its narrow layers allow.
    defaults = LoraSettings() if args.full_size else LoraSettings(rank=8, alpha=8.0)
    rank, alpha = args.lora_rank or defaults.rank, args.lora_alpha or defaults.alpha
    output = work / f"run-{args.case}" if args.case else work / "run"
    run_config = {
        "output_dir": str(output),
        "model": {"path": str(model), "dtype": "bfloat16" if cuda else "float32",
                  "gradient_checkpointing": args.checkpointing},
        "data": {"shards": str(shards)},
        "lora": {"rank": rank, "alpha": alpha},
        "optim": {"lr": 1e-4},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "grad_accum_steps": 1, "seed": 0},
        "deepspeed": {"config": str(ds_config)},
        "checkpoint": {"every_steps": args.steps, "keep_last": 1, "resume": "none"},
        "log": {"every_steps": 1, "tensorboard": False, "progress_bar": False},
    }
    config_path = output.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(run_config))
    report: dict = {
        "case": args.case or "default", "overrides": list(args.set),
        "mode": "full-size-cuda" if args.full_size else f"tiny-{'cuda' if cuda else 'cpu'}",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "family": info.family.name,
        "geometry": args.geometries or f"{info.frames}x{info.height}x{info.width}", "ranks": args.nproc,
        "micro_batch_size": args.micro_batch, "zero": args.zero,
        "torch_adam": args.torch_adam, "gradient_checkpointing": args.checkpointing,
        "lora": {"rank": rank, "alpha": alpha}, "num_layers": args.num_layers or info.transformer_config["num_layers"],
        "checkpoint_setup_s": round(setup_s, 1), "returncode": None, "log": str(output.with_suffix(".log")),
        "metrics": str(output / "metrics.jsonl"),
    }
    save(report, args.json)  # a run cut short still leaves the set-up and where the logs are
    t0 = time.perf_counter()
    # The launcher's output goes straight to a file: if this process is killed, the log up to then remains.
    with open(output.with_suffix(".log"), "w") as log:
        launch = subprocess.run([sys.executable, "-m", "cogvx_dist", "train", "--config", str(config_path),
                                 "--nproc", str(args.nproc), *args.set], stdout=log, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO)
    report.update({"train_command_s": round(time.perf_counter() - t0, 1), "returncode": launch.returncode})
    if launch.returncode != 0:
        lines = output.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        report["error"] = lines[-1] if lines else "(no output)"
        return report
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [m for m in metrics if m["step"] > args.warmup] or metrics
    step_times = [m["step_time_s"] for m in timed]
    report.update({
        "steps_timed": len(timed),
        "s_per_step_median": round(statistics.median(step_times), 4),
        "s_per_step_min": round(min(step_times), 4),
        "samples_per_s_median": round(statistics.median(m["samples_per_s"] for m in timed), 3),
        "tokens_per_s_median": round(statistics.median(m["tokens_per_s"] for m in timed), 1),
        "tokens_per_s_mean": round(statistics.mean(m["tokens_per_s"] for m in timed), 1),
        "data_wait_s_median": round(statistics.median(m["data_wait_s"] for m in timed), 5),
        "data_wait_share_median": round(statistics.median(m["data_wait_s"] / m["step_time_s"] for m in timed), 4),
        "peak_memory_gib": round(max(m["peak_memory_gib"] for m in metrics), 2),
        "tflops_per_gpu_median": round(statistics.median(m.get("tflops_per_gpu") or 0.0 for m in timed), 1),
        "mfu_median": (round(statistics.median(m["mfu"] for m in timed), 4)
                       if all(m.get("mfu") is not None for m in timed) else None),
        "attention": metrics[-1].get("attention"),
        "loss_first_last": [round(metrics[0]["loss"], 4), round(metrics[-1]["loss"], 4)],
    })
    reference = REFERENCE.get(info.family.name)
    if args.full_size and reference and not args.num_layers and args.nproc == 1:
        report["reference"] = reference
        report["vs_reference"] = round(report["s_per_step_median"] / reference["s_per_step"], 3)
    return report


def parse_geometry(text: str) -> tuple[int, int, int]:
    """"9x32x64" -> (frames, height, width)."""
    try:
        frames, height, width = (int(part) for part in text.strip().split("x"))
    except ValueError:
        raise SystemExit(f"--geometries: {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 9x32x64") from None
    return frames, height, width


MIXED = "9x32x32,9x32x64,17x32x32,17x32x64"
"""Tiny 2b, 2 frame x 2 resolution buckets: 12, 24, 20 and 40 video tokens a sample (mean 24)."""
SINGLE = "9x32x64"
"""One bucket of the mixed set's mean tokens (24 a sample), so the same sample count is the same token count."""


def mixed_buckets(args: argparse.Namespace) -> dict:
    """The mixed-bucket dataset against one bucket of the same token count, same steps and micro-batch size."""
    reports = {}
    for case, geometries in (("mixed", MIXED), ("single", SINGLE)):
        reports[case] = bench(argparse.Namespace(**{**vars(args), "case": case, "geometries": geometries,
                                                    "reuse_model": case == "single" or args.reuse_model}))
    mixed, single = reports["mixed"], reports["single"]
    report = {"mixed": mixed, "single": single, "returncode": mixed["returncode"] or single["returncode"]}
    if report["returncode"] == 0:
        report["mixed_vs_single"] = {
            name: round(mixed[name] / single[name], 3) if single[name] else None
            for name in ("samples_per_s_median", "tokens_per_s_mean", "s_per_step_median")}
        report["data_wait_share"] = {"mixed": mixed["data_wait_share_median"],
                                     "single": single["data_wait_share_median"]}
    return report


def save(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="CUDA: the family's released transformer config")
    parser.add_argument("--family", default="CogVideoX-2b")
    parser.add_argument("--num-layers", type=int, help="full-size: fewer transformer blocks (quick checks)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--samples", type=int, default=8, help="synthetic samples in the shards")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) on this machine")
    parser.add_argument("--zero", default="zero2", help="ds_configs/ name: zero1, zero2, zero3, *_offload")
    parser.add_argument("--torch-adam", action=argparse.BooleanOptionalAction, default=None,
                        help="force torch's AdamW, or (--no-torch-adam) DeepSpeed's FusedAdam, which JIT-builds a "
                             "CUDA op first; default: the shipped auto (torch's fused AdamW on GPUs)")
    parser.add_argument("--checkpointing", type=int, default=1, help="model.gradient_checkpointing (0 = off)")
    parser.add_argument("--lora-rank", type=int, help="default 128 full-size, 8 tiny")
    parser.add_argument("--lora-alpha", type=float, help="default 64 full-size, 8 tiny")
    parser.add_argument("--work", help="folder for checkpoint, shards and run (default: a new temporary one)")
    parser.add_argument("--reuse-model", action="store_true",
                        help="keep the checkpoint and shards already in --work (cases of one family in a row)")
    parser.add_argument("--case", default="", help="name of this case (its run folder and log: WORK/run-CASE)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override passed to cogvx train, e.g. model.compile=blocks (repeatable)")
    parser.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch_size")
    parser.add_argument("--geometries", default="",
                        help="synthetic samples cycle through these FRAMESxHEIGHTxWIDTH (tiny mode), e.g. 9x32x64")
    parser.add_argument("--mixed-buckets", action="store_true",
                        help=f"two cases, micro-batches of 2: {MIXED} against {SINGLE} (same tokens)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    if args.mixed_buckets:
        args.micro_batch = 2
        args.samples = max(args.samples, 16)
    report = mixed_buckets(args) if args.mixed_buckets else bench(args)
    save(report, args.json)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["returncode"] == 0 else 1)


if __name__ == "__main__":
    main()
