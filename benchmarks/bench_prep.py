"""Prep throughput: videos/s with the split into decode, T5, VAE and write.

    python benchmarks/bench_prep.py                       # tiny checkpoint on CPU, whole prep job (run_prep)
    python benchmarks/bench_prep.py --count 32 --decode-workers 2
    python benchmarks/bench_prep.py --full-size --json r.json   # CUDA: full-size VAE + T5-XXL config, random
                                                          # weights, 49x480x720 clips; target <= 0.6 s/video (H200)
    python benchmarks/bench_prep.py --full-size --device cpu --clip 9x64x96 --t5-layers 1 --count 2   # smoke run

The tiny mode runs the real job end to end (decode workers, T5, free T5, VAE, shard writing). The full-size mode
builds the released AutoencoderKLCogVideoX config (its defaults) and a T5-XXL-config encoder with random weights
directly on the device (no checkpoint on disk), times T5 over all prompts, the decode pool alone, and then each VAE
variant (--variants: eager, channels_last, compile, their joins, tiling, batchN) through prep's own Encoders on the
same decoded mp4 clips, with decoding running ahead of the VAE as in a prep run. Every variant starts from the same
random weights, so the report also gives how far its moments are from the first variant's. With --json the report is
rewritten after each stage, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from data_prep.decode import Clip


def scratch_folder(prefix: str) -> Path:
    """A temporary folder for the benchmark's model, clips and shards, removed when the benchmark exits (the
    figures go to stdout and --json; the data is not worth keeping, and runs in a suite must not fill /tmp)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def bench_tiny(args: argparse.Namespace) -> dict:
    from cogvx_dist.core.shard_format import Manifest
    from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
    from cogvx_dist.core.tiny import make_tiny_checkpoint
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep

    work = scratch_folder("bench-prep-")
    model = Path(args.model) if args.model else make_tiny_checkpoint(work / "tiny", args.family)
    ds = make_synthetic_dataset(work / "data", count=args.count, frames=args.frames, height=args.height,
                                width=args.width, fps=8, layout="folder")
    config = PrepConfig(model=str(model), data=str(ds.data), out=str(work / "out"), progress=False,
                        decode_workers=args.decode_workers, vae_batch_size=args.vae_batch_size,
                        storage_dtype="bfloat16")
    result = run_prep(config)
    t = result.timings
    made = Manifest.read(work / "out")
    return {
        "mode": "tiny-cpu", "family": args.family, "videos": result.encoded, "seconds": round(result.seconds, 3),
        "videos_per_s": round(result.videos_per_second, 3),
        "s_per_video": {k.removesuffix("_s"): round(v / max(1, result.encoded), 4) for k, v in t.items()},
        "source": f"{args.frames}x{args.height}x{args.width} mp4 -> {made.frames}x{made.height}x{made.width}",
    }


TARGET_S_PER_VIDEO = 0.6
"""The prep target: seconds per 49x480x720 clip on one H200 with the full-size VAE, T5 included
(docs/BENCHMARKS.md; not measured yet)."""
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}
"""The CogVideoX text encoder's config (google t5-v1_1-xxl), less its layer count (--t5-layers)."""

VARIANT_TOKENS = ("channels_last", "compile", "tiling", "batchN")
"""What a full-size variant name may join with '+': the prep switches vae_channels_last, vae_compile, vae_tiling,
and batchN (vae_batch_size N without slicing). 'eager' is none of them: diffusers' untiled encode as prep runs it."""


def parse_variant(name: str) -> dict:
    """'channels_last+compile' -> the Encoders switches and VAE batch size it stands for."""
    spec = {"channels_last": False, "compile": False, "tiling": False, "batch": 1}
    for token in filter(None, name.split("+")):
        if token == "eager":
            continue
        if token.startswith("batch") and token[5:].isdigit() and int(token[5:]) >= 1:
            spec["batch"] = int(token[5:])
        elif token in spec and token != "batch":
            spec[token] = True
        else:
            raise SystemExit(f"unknown variant part {token!r} in {name!r}; join eager or {', '.join(VARIANT_TOKENS)}"
                             " with '+'")
    return spec


def parse_clip(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--clip must be FRAMESxHEIGHTxWIDTH, e.g. 49x480x720, not {text!r}") from None
    return frames, height, width


def bench_full_size(args: argparse.Namespace) -> dict:
    """Each variant on the same decoded clips: warm-up (compile), then a pipelined pass with decode running ahead."""
    import gc
    import traceback
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cogvx_dist.core.families import get_family
    from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
    from data_prep.decode import decode_video

    text_length = get_family("CogVideoX-2b").text_max_length
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "")
    if not device:
        raise SystemExit("--full-size needs a CUDA device (or --device cpu with a small --clip for a smoke run)")
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    frames, height, width = parse_clip(args.clip)
    named = [v for v in args.variants.split(",") if v]
    specs = {name: parse_variant(name) for name in named}
    # Compiled variants last: a compile that runs long or fails must not cost the eager figures.
    variants = sorted(named, key=lambda name: specs[name]["compile"])
    work = scratch_folder("bench-prep-full-")
    # Source clips a bit larger than the target, so that decoding includes a real resize and center crop.
    source = (height + height // 8 + 1) // 2 * 2, (width + width // 8 + 1) // 2 * 2
    dataset = make_synthetic_dataset(work / "data", count=args.count, frames=frames, height=source[0],
                                     width=source[1], fps=8, layout="folder")
    paths = [dataset.root / s for s in dataset.good]
    decode = lambda p: decode_video(p, frames, [(height, width)], target_fps=8)  # noqa: E731

    report: dict = {
        "mode": f"full-size-{device.split(':')[0]}",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": package_versions(), "dtype": str(dtype).removeprefix("torch."), "videos": args.count,
        "clip": f"{frames}x{height}x{width} (decoded from {frames}x{source[0]}x{source[1]} mp4)",
        "t5_layers": args.t5_layers, "target_s_per_video": TARGET_S_PER_VIDEO, "variants": {},
    }

    def save() -> None:
        verdict(report, cuda and frames == 49 and (height, width) == (480, 720))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    # Decode alone with the worker pool: its rate must exceed the VAE's for decoding to stay hidden.
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.decode_workers) as pool:
        clips = list(pool.map(decode, paths))
    report["decode_pool_s_per_video"] = round((time.perf_counter() - t0) / args.count, 4)
    save()

    # T5 first (the T5-XXL config, random weights): all prompts in batches, as prep runs it. Its figure is part of
    # every verdict below, so it must not wait behind the VAE variants.
    try:
        report["t5"] = bench_t5(args, device, dtype, text_length)
    except Exception as err:
        traceback.print_exc()
        report["t5"] = {"error": f"{type(err).__name__}: {first_line_of(err)}"}
    save()

    reference = None
    for name in variants:
        print(f"[bench] variant {name} ...", file=sys.stderr, flush=True)
        try:
            result, mean = bench_vae_variant(specs[name], clips[0], paths, decode, args, device, dtype,
                                             text_length)
        except Exception as err:  # a variant that fails (e.g. compile on this stack) must not lose the others
            traceback.print_exc()
            result, mean = {"error": f"{type(err).__name__}: {first_line_of(err)}"}, None
            del err
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if mean is not None:
            if reference is None:
                reference, result["moments_vs"] = mean, "itself (first variant)"
            else:
                result["moments_vs"] = variants[0]
                result["mean_max_abs_diff"] = round((mean - reference).abs().max().item(), 5)
                result["mean_abs_diff"] = round((mean - reference).abs().mean().item(), 6)
        report["variants"][name] = result
        print(f"[bench] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        save()

    save()
    return report


def verdict(report: dict, target_geometry: bool) -> None:
    """The best variant so far and whether it meets the target with T5 (rewritten after every variant, so that a
    call cut short still says where it stood)."""
    timed = {n: v["s_per_video"]["pipelined"] for n, v in report["variants"].items() if "s_per_video" in v}
    if not timed:
        return
    best = min(timed, key=timed.get)
    t5_s = report.get("t5", {}).get("s_per_video")
    report["best"] = {"variant": best, "s_per_video": timed[best],
                      "with_t5_s_per_video": None if t5_s is None else round(timed[best] + t5_s, 4)}
    report["best"]["meets_target"] = bool(target_geometry and t5_s is not None
                                          and report["best"]["with_t5_s_per_video"] <= TARGET_S_PER_VIDEO)
    report["decode_keeps_up"] = report["decode_pool_s_per_video"] <= timed[best]


def package_versions() -> dict[str, str]:
    """The versions the figures were measured with."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "peft", "deepspeed", "av", "webdataset"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def first_line_of(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


def bench_t5(args: argparse.Namespace, device: str, dtype: torch.dtype, text_length: int) -> dict:
    """T5 seconds per prompt and prompts/s over --count prompts in --text-batch-size batches (after a warm-up)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        t5 = T5EncoderModel(T5Config(**T5_XXL, num_layers=args.t5_layers)).to(dtype).eval()
    ids = torch.randint(0, T5_XXL["vocab_size"], (args.count, text_length), device=device)
    with torch.inference_mode():
        t5(ids[:1])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, args.count, args.text_batch_size):
            t5(ids[start : start + args.text_batch_size])[0].to("cpu")
        _sync(device)
    seconds = time.perf_counter() - t0
    del t5
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"s_per_video": round(seconds / args.count, 4), "prompts_per_s": round(args.count / seconds, 1)}


def bench_vae_variant(spec: dict, first_clip: Clip, paths: list[Path], decode: Callable[[Path], Clip],
                      args: argparse.Namespace, device: str, dtype: torch.dtype,
                      text_length: int) -> tuple[dict, torch.Tensor]:
    """(timings, posterior mean of the first clip) for one variant, through prep's own Encoders."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import webdataset as wds
    from diffusers import AutoencoderKLCogVideoX

    from cogvx_dist.core import shard_format
    from data_prep.encode import Encoders

    cuda = device.startswith("cuda")
    torch.manual_seed(0)  # the same random weights in every variant, so their moments compare
    with torch.device(device):
        vae = AutoencoderKLCogVideoX().to(dtype).eval().requires_grad_(False)  # defaults = the released config
    encoders = Encoders("<random full-size weights>", device, dtype, slicing=spec["batch"] == 1,
                        tiling=spec["tiling"], channels_last=spec["channels_last"], compile=spec["compile"])
    encoders.store.put("vae", vae)
    del vae

    t0 = time.perf_counter()
    mean, _ = encoders.encode_clips([first_clip.frames] * spec["batch"])  # warm-up: cuDNN autotune, compile
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    embeds = torch.zeros(text_length, T5_XXL["d_model"], dtype=torch.bfloat16)
    writer = wds.TarWriter(io.BytesIO(), encoder=False)
    vae_s = write_s = wait_s = 0.0
    total0 = time.perf_counter()
    batch: list = []
    with ThreadPoolExecutor(args.decode_workers) as pool:
        futures = [pool.submit(decode, p) for p in paths]  # decode runs ahead of the VAE, as in a prep run
        for i, future in enumerate(futures):
            t0 = time.perf_counter()
            batch.append(future.result())
            wait_s += time.perf_counter() - t0
            if len(batch) < spec["batch"] and i + 1 < len(futures):
                continue
            t0 = time.perf_counter()
            means, logvars = encoders.encode_clips([clip.frames for clip in batch])
            _sync(device)
            t1 = time.perf_counter()
            for j in range(len(batch)):
                writer.write(shard_format.encode_sample(f"k{i:06d}-{j}", {
                    shard_format.LATENT_MEAN: means[j].bfloat16(), shard_format.LATENT_LOGVAR: logvars[j].bfloat16(),
                    shard_format.PROMPT_EMBEDS: embeds}, {"i": i}))
            vae_s += t1 - t0
            write_s += time.perf_counter() - t1
            batch = []
    pipelined_s = time.perf_counter() - total0
    n = len(paths)
    result = {
        "warmup_s": round(warmup_s, 2),
        "s_per_video": {"vae": round(vae_s / n, 4), "write": round(write_s / n, 4),
                        "decode_wait": round(wait_s / n, 4), "pipelined": round(pipelined_s / n, 4)},
        "latent_shape": list(means.shape[1:]),
    }
    if cuda:
        result["vae_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    encoders.release_vae()
    return result, mean[0]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=16, help="clips")
    parser.add_argument("--full-size", action="store_true", help="full-size VAE and T5-XXL config, random weights")
    parser.add_argument("--model", help="tiny mode: an existing checkpoint instead of a fresh tiny one")
    parser.add_argument("--family", default="CogVideoX-2b")
    parser.add_argument("--frames", type=int, default=16, help="tiny mode: source clip frames")
    parser.add_argument("--height", type=int, default=48, help="tiny mode: source clip height")
    parser.add_argument("--width", type=int, default=64, help="tiny mode: source clip width")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--vae-batch-size", type=int, default=1, help="tiny mode")
    parser.add_argument("--text-batch-size", type=int, default=16)
    parser.add_argument("--clip", default="49x480x720", help="full-size: FRAMESxHEIGHTxWIDTH to encode")
    parser.add_argument("--device", help="full-size: cuda[:N] (default) or cpu for a smoke run")
    parser.add_argument("--t5-layers", type=int, default=24, help="full-size: T5 layers (24 = T5-XXL)")
    parser.add_argument("--variants", default="eager,channels_last,compile,channels_last+compile,tiling",
                        help="full-size: comma-separated VAE variants, each eager or a '+' join of "
                             + ", ".join(VARIANT_TOKENS))
    parser.add_argument("--json", help="also write the report here (rewritten after every variant)")
    args = parser.parse_args()
    report = bench_full_size(args) if args.full_size else bench_tiny(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
