"""Prep throughput: videos/s with the split into decode, T5, VAE and write.

    python benchmarks/bench_prep.py                       # tiny checkpoint on CPU, whole prep job (run_prep)
    python benchmarks/bench_prep.py --count 32 --decode-workers 2
    python benchmarks/bench_prep.py --full-size           # CUDA: full-size VAE + T5-XXL config, random weights,
                                                          # 49x480x720 clips; target <= 0.6 s/video on one H200

The tiny mode runs the real job end to end (decode workers, T5, free T5, VAE, shard writing). The full-size mode
builds the released AutoencoderKLCogVideoX config (its defaults) and a T5-XXL-config encoder with random weights
directly on the GPU (no checkpoint on disk), plugs them into the prep encoders, and times each stage on real
decoded 49x480x720 mp4 clips, with the decode pool running ahead of the VAE as in a prep run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_tiny(args: argparse.Namespace) -> dict:
    from cogvx_dist.data.schema import Manifest
    from cogvx_dist.models.tiny import make_tiny_checkpoint
    from data_prep.config import PrepConfig
    from data_prep.run import run_prep
    from data_prep.synthetic import make_synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
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


def bench_full_size(args: argparse.Namespace) -> dict:
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    from cogvx_dist.data import schema
    from data_prep.decode import decode_video
    from data_prep.encode import Encoders
    from data_prep.synthetic import make_synthetic_dataset

    if not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA device")
    device, dtype = "cuda:0", torch.bfloat16
    torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="bench-prep-full-"))
    # Source clips a bit larger than the target so decode includes a real resize + crop.
    ds = make_synthetic_dataset(work / "data", count=args.count, frames=49, height=544, width=816, fps=8,
                                layout="folder")

    with torch.device(device):
        vae = AutoencoderKLCogVideoX().to(dtype).eval().requires_grad_(False)  # defaults = the released config
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu")).to(dtype).eval()
    encoders = Encoders("<random>", device, dtype, slicing=True, tiling=args.tiling)
    encoders.store._loaded["vae"] = vae  # random-weight full-size VAE in place of a checkpoint's
    if args.tiling:
        vae.enable_tiling()
    if args.channels_last:
        vae.to(memory_format=torch.channels_last_3d)

    # T5: the prompts of all clips, in batches, as prep runs it.
    ids = torch.randint(0, 32128, (args.count, 226), device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, args.count, args.text_batch_size):
            t5(ids[start : start + args.text_batch_size])[0].to("cpu")
    torch.cuda.synchronize()
    t5_s = time.perf_counter() - t0
    del t5
    torch.cuda.empty_cache()

    paths = [ds.root / s for s in ds.good]
    decode = lambda p: decode_video(p, 49, [(480, 720)], target_fps=8)  # noqa: E731
    # Decode alone with the worker pool: its throughput must exceed the VAE's.
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.decode_workers) as pool:
        clips = list(pool.map(decode, paths))
    decode_s = time.perf_counter() - t0
    encoders.encode_clips([clips[0].frames])  # warm-up (cudnn autotune)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    vae_s = write_s = 0.0
    embeds = torch.zeros(226, 4096, dtype=torch.bfloat16)
    total0 = time.perf_counter()
    import io
    import webdataset as wds

    sink = io.BytesIO()
    writer = wds.TarWriter(sink, encoder=False)
    with ThreadPoolExecutor(args.decode_workers) as pool:
        for i, clip in enumerate(pool.map(decode, paths)):  # the pipelined run: decode ahead of the VAE
            t0 = time.perf_counter()
            mean, logvar = encoders.encode_clips([clip.frames])
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            writer.write(schema.encode_sample(f"k{i:06d}", {schema.LATENT_MEAN: mean[0].bfloat16(),
                                                            schema.LATENT_LOGVAR: logvar[0].bfloat16(),
                                                            schema.PROMPT_EMBEDS: embeds}, {"i": i}))
            vae_s += t1 - t0
            write_s += time.perf_counter() - t1
    pipelined_s = time.perf_counter() - total0
    n = args.count
    return {
        "mode": "full-size-cuda", "device": torch.cuda.get_device_name(0), "videos": n, "tiling": args.tiling,
        "clip": "49x480x720 (from 49x544x816 mp4)", "latent_shape": list(mean.shape[1:]),
        "s_per_video": {"decode_pool": round(decode_s / n, 4), "t5": round(t5_s / n, 4), "vae": round(vae_s / n, 4),
                        "write": round(write_s / n, 4), "pipelined_total": round(pipelined_s / n + t5_s / n, 4)},
        "decode_keeps_up": decode_s / n <= vae_s / n,
        "vae_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "target_s_per_video": 0.6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=16, help="clips")
    parser.add_argument("--full-size", action="store_true", help="CUDA: full-size VAE and T5-XXL, 49x480x720")
    parser.add_argument("--model", help="tiny mode: an existing checkpoint instead of a fresh tiny one")
    parser.add_argument("--family", default="CogVideoX-2b")
    parser.add_argument("--frames", type=int, default=16, help="tiny mode: source clip frames")
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--vae-batch-size", type=int, default=1)
    parser.add_argument("--text-batch-size", type=int, default=16)
    parser.add_argument("--tiling", action="store_true", help="full-size: VAE tiling on (less memory, slower)")
    parser.add_argument("--channels-last", action="store_true", help="full-size: channels_last_3d VAE weights")
    args = parser.parse_args()
    report = bench_full_size(args) if args.full_size else bench_tiny(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
