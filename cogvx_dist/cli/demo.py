"""`cogvx demo [--out demo_out]`: the whole pipeline on an embedded default (tiny model, synthetic clips)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(demo: argparse.ArgumentParser, name: str = "demo") -> None:
    """Arguments and handler of `cogvx demo`."""
    demo.set_defaults(handler=run)
    demo.add_argument("--out", default="demo_out", help="output folder (an earlier demo there is replaced)")
    demo.add_argument("--clips", type=int, default=16, help="synthetic captioned clips (default 16)")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    demo.add_argument("--inference-steps", type=int, default=10, help="denoising steps per sampled clip (default 10)")
    demo.add_argument("--lr", type=float, default=2e-2, help="peak learning rate (default 2e-2)")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    demo.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (default 8)")
    demo.add_argument("--prep-processes", type=int, default=2, help="prep processes (default 2)")
    demo.add_argument("--nproc", type=int, default=0,
                      help="training ranks (default: 2 on CPU, one per GPU up to 2 on a GPU machine)")
    demo.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="seed of model, clips, training and sampling")
    demo.add_argument("--prompt", help="prompt to sample (default: the first clip's caption)")


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.core.logs import quiet_libraries
    from cogvx_dist.results.demo import DemoSettings, run_demo

    quiet_libraries()
    settings = DemoSettings(out=Path(args.out), clips=args.clips, steps=args.steps,
                            inference_steps=args.inference_steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                            prep_processes=args.prep_processes, train_ranks=args.nproc, device=args.device,
                            seed=args.seed, prompt=args.prompt or "")
    result = run_demo(settings)
    train, sample = result.numbers["train"], result.numbers["sample"]
    print(
        f"\ndemo done in {result.numbers['total_s']:.0f} s on {result.device}: loss {train['loss_first_fifth']:.4f} -> "
        f"{train['loss_last_fifth']:.4f} (first/last fifth of {train['steps']} steps), "
        f"{train['samples_per_s']:.2f} train samples/s, {result.numbers['prep']['videos_per_s']:.2f} prep videos/s, "
        f"with-vs-without-LoRA mean abs pixel difference {sample['mean_abs_pixel_difference']:.4f}\n"
        f"  summary:    {result.paths['summary']}\n"
        f"  loss curve: {result.paths['loss_curve']}\n"
        f"  clips:      {result.paths['without_lora']}  vs  {result.paths['with_lora']}\n"
        f"  comparison: {result.paths['comparison']}"
    )
    return 0
