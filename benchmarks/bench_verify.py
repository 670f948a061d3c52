"""What `data.verify: sha256` (the default) costs a training rank: the SHA-256 of one full-size sample as stored
(bf16 latent moments and T5 embeddings, the bytes a rank reads), beside the H200 step time that sample feeds.

    python benchmarks/bench_verify.py --json benchmarks/results/bench_verify-2cpu.json

The digest runs where the sample is read: in the loader worker on a GPU host (overlapped with the step), in the
training process on the CPU. The share reported is the cost if it were not overlapped at all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_train import REFERENCE  # noqa: E402

CASES = (("CogVideoX-2b", 49, 480, 720), ("CogVideoX-5b", 49, 480, 720), ("CogVideoX1.5-5b", 81, 768, 1360))
"""Each family at its released geometry."""


def full_size_sample(family_name: str, frames: int, height: int, width: int) -> dict:
    import torch

    from cogvx_dist.core import shard_format
    from cogvx_dist.core.families import get_family

    family = get_family(family_name)
    config = family.full_size_transformer
    moments = family.latent_shape(config["out_channels"], frames, height, width)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        shard_format.LATENT_MEAN: torch.randn(moments, generator=generator).to(torch.bfloat16),
        shard_format.LATENT_LOGVAR: torch.randn(moments, generator=generator).to(torch.bfloat16),
        shard_format.PROMPT_EMBEDS: torch.randn(family.text_max_length, config["text_embed_dim"],
                                                generator=generator).to(torch.bfloat16),
    }
    return shard_format.encode_sample("sample", tensors, {"prompt": "a full-size sample"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()

    from cogvx_dist.core.shard_format import TENSORS_EXT, sample_digest

    report: dict = {"cpus": os.cpu_count(), "cases": []}
    for family, frames, height, width in CASES:
        sample = full_size_sample(family, frames, height, width)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            sample_digest(sample)
            times.append(time.perf_counter() - started)
        case = {"family": family, "geometry": f"{frames}x{height}x{width}",
                "sample_mb": round(len(sample[TENSORS_EXT]) / 1e6, 2),
                "digest_ms": round(statistics.median(times) * 1000, 2)}
        if family in REFERENCE:
            step = REFERENCE[family]["s_per_step"]
            case["h200_step_s"] = step
            case["share_of_step_percent"] = round(100 * statistics.median(times) / step, 2)
        report["cases"].append(case)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
