"""The prep job of one process: take this rank's slice, skip what is done, encode the rest, write shards, merge.

Per chunk of records (config.text_chunk): T5 embeds every prompt, T5 is freed, then the VAE encodes the clips that
decode workers prepare ahead of it, and samples are written as they finish. Everything is keyed by
`schema.sample_key(source)`, so a rerun skips samples already in complete shards and encodes nothing twice.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cogvx_dist.core import shard_format as schema
from cogvx_dist.core.errors import CogvxError
from data_prep.config import PrepConfig
from data_prep.decode import BadInput, Clip, decode_video, load_image
from data_prep.inputs import Record, read_records
from data_prep.ranks import RankInfo, discover_ranks
from data_prep import shards as shardio

CRASH_ENV = "COGVX_PREP_CRASH_AFTER"
"""Test hook: exit hard (os._exit) after this many samples were written by this process, mid-shard."""


@dataclass
class PrepResult:
    """What one process did."""

    rank: int
    world_size: int
    inputs: int
    """Records in this rank's slice."""
    already_done: int
    """Records of the slice found in complete shards at start (resume)."""
    encoded: int
    """Samples encoded and written by this run."""
    failed: int
    """Records this run could not use (see errors.jsonl)."""
    shards: int
    """Shards completed by this run."""
    bytes: int
    """Bytes of those shards."""
    seconds: float
    """Wall time of the run."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds in decode (worker time), decode_wait (encoder waiting for decode), t5, vae, write."""
    manifest: str | None = None
    """manifest.json path when this process merged the job's manifest."""
    job_inputs: int | None = None
    """Records in the whole job (when this process merged)."""
    job_skipped: int | None = None
    """Unusable records in the whole job (when this process merged)."""
    exit_code: int = 0
    """0, or 1 when the failed fraction passed config.max_failed_fraction."""

    @property
    def videos_per_second(self) -> float:
        """Encoded videos per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _logger(rank: int) -> Callable[[str], None]:
    def log(message: str) -> None:
        # Rank 0 speaks plainly; other ranks say who they are so interleaved logs stay readable.
        prefix = "" if rank == 0 else f"[rank {rank}] "
        print(f"{prefix}{message}", file=sys.stderr, flush=True)

    return log


def _header(config: PrepConfig, info: Any, frames: int, buckets: list[tuple[int, int]], fps: float) -> dict[str, Any]:
    """The manifest fields every rank must agree on (all but shards, skipped and extra)."""
    from cogvx_dist.core.loading import read_component_config

    family = info.family
    vae = read_component_config(config.model, "vae")
    text_encoder = read_component_config(config.model, "text_encoder")
    scaling = _config_number(config, "vae", vae, "scaling_factor", default=family.vae_scaling_factor, whole=False)
    temporal = _config_number(config, "vae", vae, "temporal_compression_ratio", default=4)
    latent_channels = _config_number(config, "vae", vae, "latent_channels", default=16)
    text_embed_dim = _config_number(config, "text_encoder", text_encoder, "d_model")
    names = [schema.LATENT_MEAN, schema.LATENT_LOGVAR, schema.PROMPT_EMBEDS]
    if family.image_to_video:
        names += [schema.IMAGE_MEAN, schema.IMAGE_LOGVAR]
    return {
        "family": family.name,
        "model": config.model_id or str(config.model),
        "vae_scaling_factor": scaling,
        "invert_scale_latents": bool(family.invert_scale_latents),
        "latent_channels": latent_channels,
        "frames": frames,
        "height": buckets[0][0],
        "width": buckets[0][1],
        "latent_frames": (frames - 1) // temporal + 1,
        "fps": float(fps),
        "text_max_length": family.text_max_length,
        "text_embed_dim": text_embed_dim,
        "dtypes": {name: config.storage_dtype for name in names},
        "image_to_video": family.image_to_video,
        "latent_scaling": schema.LATENT_SCALING,
        "buckets": [list(b) for b in buckets],
    }


def _config_number(config: PrepConfig, subfolder: str, values: dict[str, Any], key: str,
                   default: float | None = None, whole: bool = True) -> Any:
    """A positive number from a component's config (`default` when absent); a missing value with no default, or a
    value that is not a positive (whole) number, is a CogvxError naming the file and key."""
    value = values.get(key) or default
    where = f"{config.model}/{subfolder}/config.json"
    if value is None:
        raise CogvxError(f"{where}: no {key!r} (needed for the manifest)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
            whole and not float(value).is_integer()):
        kind = "whole number" if whole else "number"
        raise CogvxError(f"{where}: {key!r} must be a positive {kind}, not {value!r}")
    return int(value) if whole else float(value)


def _decode_task(root: Path, record: Record, frames: int, buckets: list[tuple[int, int]], config: PrepConfig,
                 family_fps: float, image_to_video: bool) -> tuple[Clip, np.ndarray | None, float]:
    """Decode one record (runs in a worker thread); returns the clip, the I2V conditioning image and its seconds."""
    start = time.perf_counter()
    clip = decode_video(root / record.video, frames, buckets, target_fps=config.target_fps,
                        stride=config.frame_stride, default_fps=family_fps)
    image = None
    if image_to_video:
        bucket = (clip.frames.shape[1], clip.frames.shape[2])
        # The conditioning frame is the listed image where there is one, else the clip's own first frame.
        image = load_image(root / record.image, bucket) if record.image else clip.frames[:1]
    return clip, image, time.perf_counter() - start


def _ordered_prefetch(pool: ThreadPoolExecutor, items: list[Record], fn: Callable[[Record], Any], window: int):
    """Yield (item, future) in input order, keeping at most `window` decodes in flight (bounds memory)."""
    queue: collections.deque[tuple[Record, Future]] = collections.deque()
    it = iter(items)
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= window:
            break
    while queue:
        item, future = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, future


def run_prep(config: PrepConfig, ranks: RankInfo | None = None) -> PrepResult:
    """Run this process's share of a prep job (and merge the manifest when this process is the last or rank 0)."""
    import torch

    from cogvx_dist.core.loading import describe_checkpoint
    from data_prep.encode import DTYPES, Encoders, pick_compute_dtype, pick_device

    started = time.perf_counter()
    config.check_basic()
    info = describe_checkpoint(config.model)
    family = info.family
    frames = config.check_family(family, info.frames)
    buckets = list(config.buckets) or [(info.height, info.width)]
    if config.target_fps is None and config.frame_stride is None:
        config = config.replace(target_fps=float(family.fps))
    fps = config.target_fps if config.target_fps is not None else float(family.fps)
    ranks = ranks or discover_ranks(config.rank, config.world_size)
    rank, world = ranks.rank, ranks.world_size
    log = _logger(rank)

    root, records = read_records(config.data, config.layout)
    out = Path(config.out)
    header = _header(config, info, frames, buckets, fps)  # before anything is written: it checks the configs
    (out / shardio.PARTS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(config).items() if k in (
        "target_fps", "frame_stride", "vae_tiling", "vae_slicing", "vae_channels_last", "vae_compile",
        "storage_dtype", "compute_dtype", "layout", "max_failed_fraction")}
    settings["data"] = str(config.data)

    # Resume: settings must match what is already in the folder; complete shards (of any rank) are kept.
    parts = shardio.all_parts(out)
    for other_rank, other in parts.items():
        if other["header"] != header:
            diff = sorted(k for k in set(header) | set(other["header"]) if header.get(k) != other["header"].get(k))
            raise CogvxError(
                f"{out} holds shards made with other settings ({', '.join(diff)} differ from rank {other_rank}'s); "
                "use a new --out folder or the same settings"
            )
    mine_before = parts.get(rank)
    own_shards = shardio.recover_rank_shards(out, rank, mine_before["shards"] if mine_before else [])
    done = {k for r, p in parts.items() if r != rank for e in p["shards"] for k in e.keys}
    done.update(k for e in own_shards for k in e.keys)

    mine = records[rank::world]  # disjoint, deterministic, balanced
    todo = [r for r in mine if r.key not in done]
    already = len(mine) - len(todo)
    part: dict[str, Any] = {
        "rank": rank, "world_size": world, "complete": False, "header": header, "settings": settings,
        "inputs": len(mine), "shards": own_shards, "stats": {},
    }
    shardio.write_part(out, part)

    # Errors of earlier runs are retried: this run's errors file starts empty.
    errors_path = shardio.rank_errors_path(out, rank)
    errors_file = open(errors_path, "w")
    failed = 0
    timings = {"decode_s": 0.0, "decode_wait_s": 0.0, "t5_s": 0.0, "vae_s": 0.0, "write_s": 0.0}

    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=already, position=rank if world <= 16 else 0, desc=f"prep r{rank}",
               unit="video", disable=not config.progress, dynamic_ncols=True, mininterval=1.0, leave=True)

    def fail(record: Record, reason: str) -> None:
        nonlocal failed
        failed += 1
        item = {"source": record.source, "video": record.video, "origin": record.origin, "reason": reason,
                "rank": rank}
        errors_file.write(json.dumps(item, sort_keys=True) + "\n")
        errors_file.flush()
        bar.update(1)

    usable = []
    for record in todo:
        if record.problem:
            fail(record, record.problem)
        else:
            usable.append(record)

    if already:
        log(f"resuming: {already} of {len(mine)} inputs of rank {rank} are already in complete shards")

    def on_shard(entry: schema.ShardEntry) -> None:
        part["shards"].append(entry)
        shardio.write_part(out, part)

    writer = shardio.ShardWriter(out, rank, shardio.next_shard_index(out, rank, own_shards),
                                 config.shard_max_bytes, config.shard_max_samples, on_shard)
    encoded = 0
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    storage = DTYPES[config.storage_dtype]
    device = pick_device(config.device, ranks.local_rank)
    compute = pick_compute_dtype(config.compute_dtype, device)
    encoders = Encoders(config.model, device, compute, slicing=config.vae_slicing, tiling=config.vae_tiling,
                        channels_last=config.vae_channels_last, compile=config.vae_compile)
    i2v = family.image_to_video
    if usable:
        log(f"rank {rank}/{world} ({ranks.source}): {len(usable)} to encode on {device} ({compute}), "
            f"{frames} frames, buckets {', '.join(f'{h}x{w}' for h, w in buckets)}")

    def flush(batch: list[tuple[Record, Clip, np.ndarray | None, torch.Tensor]]) -> None:
        nonlocal encoded
        if not batch:
            return
        t0 = time.perf_counter()
        mean, logvar = encoders.encode_clips([clip.frames for _, clip, _, _ in batch])
        if i2v:
            image_mean, image_logvar = encoders.encode_clips([image for _, _, image, _ in batch])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        timings["vae_s"] += t1 - t0
        for i, (record, clip, _, embeds) in enumerate(batch):
            tensors = {
                schema.LATENT_MEAN: mean[i].to(storage),
                schema.LATENT_LOGVAR: logvar[i].to(storage),
                schema.PROMPT_EMBEDS: embeds.to(storage),
            }
            if i2v:
                tensors[schema.IMAGE_MEAN] = image_mean[i].to(storage)
                tensors[schema.IMAGE_LOGVAR] = image_logvar[i].to(storage)
            meta = {
                "prompt": record.prompt, "source": record.source, "video": record.video, "image": record.image,
                "frames": frames, "height": int(clip.frames.shape[1]), "width": int(clip.frames.shape[2]),
                "fps": round(clip.fps, 4), "source_fps": round(clip.source_fps, 4), "stride": round(clip.stride, 4),
                "source_size": list(clip.source_size),
            }
            writer.write(record.key, tensors, meta)
            encoded += 1
            bar.update(1)
            if crash_after and encoded >= crash_after:
                writer.flush_for_crash_test()
                os._exit(3)
        timings["write_s"] += time.perf_counter() - t1

    chunks = [usable[i : i + config.text_chunk] for i in range(0, len(usable), config.text_chunk)]
    window = 2 * config.decode_workers + config.vae_batch_size
    with ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="decode") as pool:
        for chunk_index, chunk in enumerate(chunks):
            # 1) T5 for every prompt of the chunk, then free it before the VAE is loaded.
            if chunk_index:
                encoders.release_vae()
            t0 = time.perf_counter()
            embeds = encoders.encode_prompts([r.prompt for r in chunk], family.text_max_length,
                                             config.text_batch_size, storage)
            encoders.release_text_encoder()
            timings["t5_s"] += time.perf_counter() - t0
            # 2) VAE over clips decoded ahead by the pool; batches hold clips of one bucket.
            embed_of = {r.key: e for r, e in zip(chunk, embeds)}
            pending: dict[tuple[int, int], list] = {}
            task = lambda r: _decode_task(root, r, frames, buckets, config, family.fps, i2v)  # noqa: E731
            for record, future in _ordered_prefetch(pool, chunk, task, window):
                t0 = time.perf_counter()
                try:
                    clip, image, seconds = future.result()
                except BadInput as err:
                    timings["decode_wait_s"] += time.perf_counter() - t0
                    fail(record, str(err))
                    continue
                timings["decode_wait_s"] += time.perf_counter() - t0
                timings["decode_s"] += seconds
                bucket = (clip.frames.shape[1], clip.frames.shape[2])
                pending.setdefault(bucket, []).append((record, clip, image, embed_of.pop(record.key)))
                if len(pending[bucket]) >= config.vae_batch_size:
                    flush(pending.pop(bucket))
            for bucket in list(pending):
                flush(pending.pop(bucket))
    writer.close()
    encoders.release_vae()
    bar.close()
    errors_file.close()

    seconds = time.perf_counter() - started
    part["complete"] = True
    part["stats"] = {"encoded": encoded, "failed": failed, "already_done": already, "seconds": round(seconds, 3),
                     **{k: round(v, 3) for k, v in timings.items()}}
    shardio.write_part(out, part)
    result = PrepResult(rank, world, len(mine), already, encoded, failed, writer.shards_written,
                        writer.bytes_written, seconds, {k: round(v, 3) for k, v in timings.items()})
    log(summary_line(result))
    # The limit is on the whole job's inputs. A rank cannot see the other ranks' failures, so it fails on its own
    # only when its failures alone pass the job's limit (skewed bad inputs on one slice must not fail a job that is
    # under it); the merge below judges the job as a whole.
    if records and failed / len(records) > config.max_failed_fraction:
        result.exit_code = 1
        log(f"rank {rank}: {failed} failed inputs of this rank alone are more than max_failed_fraction "
            f"{config.max_failed_fraction:g} of the job's {len(records)} inputs (reasons in {errors_path})")

    # Merge: under MPI rank 0 after a barrier; otherwise whichever process sees every rank complete.
    ranks.barrier()
    if ranks.comm is not None and rank != 0:
        return result
    _, missing, _ = shardio.parts_status(out)
    if missing:
        log(f"rank(s) {', '.join(map(str, missing))} still running; the last to finish (or `cogvx prep finalize "
            f"{out}`) writes the manifest")
        return result
    manifest, inputs = shardio.finalize(out)
    result.manifest = str(out / schema.MANIFEST_NAME)
    result.job_inputs, result.job_skipped = inputs, manifest.skipped
    log(finalize_line(out, manifest, inputs))
    if inputs and manifest.skipped / inputs > config.max_failed_fraction:
        result.exit_code = 1
        log(f"{manifest.skipped} of {inputs} inputs failed, more than max_failed_fraction "
            f"{config.max_failed_fraction:g} (reasons in {out / schema.ERRORS_NAME})")
    return result


def summary_line(result: PrepResult) -> str:
    """One line per process: counts, bytes, time and the decode/T5/VAE/write split."""
    t = result.timings
    return (
        f"rank {result.rank}: encoded {result.encoded}, skipped {result.failed}, already done {result.already_done} "
        f"of {result.inputs}; {result.shards} shards, {result.bytes} bytes, {result.seconds:.1f} s "
        f"({result.videos_per_second:.2f} videos/s; decode {t.get('decode_s', 0):.2f} s in workers, "
        f"waited {t.get('decode_wait_s', 0):.2f} s, T5 {t.get('t5_s', 0):.2f} s, VAE {t.get('vae_s', 0):.2f} s, "
        f"write {t.get('write_s', 0):.2f} s)"
    )


def finalize_line(out: Path, manifest: schema.Manifest, inputs: int) -> str:
    """One line after the merge."""
    total = sum(s.bytes for s in manifest.shards)
    return (f"wrote {out / schema.MANIFEST_NAME}: {manifest.num_samples} samples in {len(manifest.shards)} shards "
            f"({total} bytes), {manifest.skipped} of {inputs} inputs skipped")
