"""The prep job of one process: take this rank's slice, skip what is done, encode the rest, write shards, merge.

Per chunk of records (config.text_chunk): T5 embeds every prompt, T5 is freed, then the VAE encodes the clips that
decode workers prepare ahead of it, and samples are written as they finish. Everything is keyed by
`shard_format.sample_key(source)` (and, with clips_per_video > 1, the clip's number: `shard_format.window_key`), so
a rerun skips samples already in complete shards and encodes nothing twice. How many clips a video gave is kept in
the progress file (`windows`), so a rerun knows a video whose clips are all written without decoding it again.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogvx_dist.core import shard_format
from cogvx_dist.core.devices import compute_dtype, pick_device, torch_dtype
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.faults import fault_hook
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.storage import is_url
from data_prep import shards as shardio
from data_prep.config import PROMPT_SLOT, PrepConfig
from data_prep.decode import BadInput, Clip, decode_image, decode_windows, load_image
from data_prep.inputs import ListFiles, Record, caption_list, not_regular, read_records, special_kind
from data_prep.publish import Publisher, default_stage, local_input
from data_prep.ranks import discover_ranks


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
    truncated_prompts: int
    """Prompts this run encoded whose T5 tokens passed the family's text length (cut there, as the pipeline cuts)."""
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


def _header(config: PrepConfig, family: Any, frames: list[int], buckets: list[tuple[int, int]],
            fps: float, single_images: bool = False) -> dict[str, Any]:
    """The manifest fields every rank must agree on, from the family and the VAE's and T5's configs."""
    from cogvx_dist.core.loading import read_component_config

    vae = read_component_config(config.model, "vae")
    text_encoder = read_component_config(config.model, "text_encoder")
    return shard_format.manifest_header(
        family, config.model_id or str(config.model),
        vae_scaling_factor=_config_number(config, "vae", vae, "scaling_factor", default=family.vae_scaling_factor,
                                          whole=False),
        latent_channels=_config_number(config, "vae", vae, "latent_channels", default=16),
        text_embed_dim=_config_number(config, "text_encoder", text_encoder, "d_model"),
        frames=frames[0], buckets=buckets, fps=fps, storage_dtype=config.storage_dtype,
        prompt_template=config.template(), image_noise_samples=config.image_noise_samples,
        single_images=single_images, frame_counts=frames, clips_per_video=config.clips_per_video)


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


Decoded = tuple[int, list[tuple[Clip, "np.ndarray | None"]], float]
"""What a decode task gives: the clips the video gives in all, those to encode with their I2V conditioning images,
and the seconds it took."""


def _decode_task(root: Path, record: Record, frames: list[int], buckets: list[tuple[int, int]], config: PrepConfig,
                 family_fps: float, image_to_video: bool, skip: frozenset[int] = frozenset()) -> Decoded:
    """Decode one record (runs in a worker thread): its clips but the windows numbered in `skip` (already written)."""
    start = time.perf_counter()
    with local_input(root, record.video) as media:  # a listed URL is downloaded here, in the decode pool
        _refuse_special(media, "")
        if record.is_image:
            return 1, [(decode_image(media, buckets), None)], time.perf_counter() - start
        count, clips = decode_windows(media, frames, buckets, target_fps=config.target_fps,
                                      stride=config.frame_stride, default_fps=family_fps,
                                      windows=config.clips_per_video, skip=skip)
    images: list[np.ndarray | None] = [None] * len(clips)
    if image_to_video and clips:
        # The conditioning frame is the listed image where there is one, else the clip's own first frame.
        if record.image:
            with local_input(root, record.image) as path:
                _refuse_special(path, f"conditioning image {path.name} is ")
                listed = load_image(path, (clips[0].frames.shape[1], clips[0].frames.shape[2]))
            images = [listed] * len(clips)
        else:
            images = [clip.frames[:1] for clip in clips]
    return count, list(zip(clips, images)), time.perf_counter() - start


def _refuse_special(path: Path, what: str) -> None:
    """BadInput for a FIFO, socket or device listed as an input, before anything opens it (a FIFO would block)."""
    kind = special_kind(path)
    if kind:
        raise BadInput(what + not_regular(kind))


def _ordered_prefetch(pool: ThreadPoolExecutor, items: list[Record], fn: Callable[[Record], Any],
                      window: int) -> Iterator[tuple[Record, Future]]:
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


class PrepJob:
    """One process's share of a prep job, phase by phase: plan the slice (resume), encode it chunk by chunk, then
    record the rank's result and merge the manifest when this process is the last (or MPI rank 0)."""

    def __init__(self, config: PrepConfig, ranks: RankInfo | None = None) -> None:
        from cogvx_dist.core.loading import describe_checkpoint

        self.started = time.perf_counter()
        config.check_basic()
        info = describe_checkpoint(config.model)
        self.family = info.family
        self.frame_counts = config.frame_buckets(self.family, info.frames, info.transformer_config)
        self.frames = self.frame_counts[0]
        self.buckets = list(config.buckets) or [(info.height, info.width)]
        if config.target_fps is None and config.frame_stride is None:
            config = config.replace(target_fps=float(self.family.fps))
        self.config = config
        self.ranks = ranks or discover_ranks(config.rank, config.world_size)
        self.rank, self.world = self.ranks.rank, self.ranks.world_size
        self.log = rank_logger("cogvx.prep", self.rank, every_rank=True)
        lists = ListFiles(config.caption_file, config.video_file, config.image_file)
        self.root, self.records = read_records(config.data, config.layout, lists)
        images = [record for record in self.records if record.is_image]
        if images and self.family.single_image_problem():
            raise CogvxError(f"{len(images)} input(s) are single images ({images[0].video}, {images[0].origin}), but "
                             f"{self.family.single_image_problem()}; list videos only for this model")
        captions = caption_list(config.data, config.layout, lists)
        if captions is not None:
            self.log.info("CogVideo layout: captions from %s", captions)
        self.publisher = Publisher(config.out, Path(config.stage or default_stage(config.out))) \
            if is_url(config.out) else None
        self.out = self.publisher.stage if self.publisher else Path(config.out)
        """Where this process writes: the output folder, or the staging folder mirrored to the output URL."""
        # Before anything is written: building the header checks the component configs.
        self.header = _header(config, self.family, self.frame_counts, self.buckets,
                              config.target_fps or self.family.fps, single_images=bool(images))
        self.failed = self.encoded = self.truncated_prompts = 0
        self.timings = {"decode_s": 0.0, "decode_wait_s": 0.0, "t5_s": 0.0, "vae_s": 0.0, "write_s": 0.0}
        self.written_fault = fault_hook("prep.written")

    def run(self) -> PrepResult:
        """Encode what this rank's slice still lacks; the result says what was done."""
        try:
            return self._run()
        except CogvxError as err:
            self._end_mpi_job(err)
            raise

    def _end_mpi_job(self, err: CogvxError) -> None:
        """Under MPI, end the whole job on this rank's own error (a full disk, a changed shard): the other ranks would
        wait for it at the final barrier forever. `cogvx prep` aborts the MPI job for unexpected errors only, since
        a CogvxError raised before the job starts (settings, inputs) is every rank's; one raised here may be this
        rank's alone. The error line is printed here: Abort may end the process before the command line prints it
        (Open MPI), or return while its launcher does so (MPICH), so the process then leaves at once."""
        if self.ranks.comm is None or self.world < 2:
            return
        print(f"cogvx prep: error: {err} (rank {self.rank} of {self.world}: ending the MPI job)", file=sys.stderr,
              flush=True)
        self.ranks.comm.Abort(2)
        os._exit(2)

    def _run(self) -> PrepResult:
        todo = self._work_left()
        errors_path = shard_format.rank_errors_path(self.out, self.rank)
        with shardio.writing(errors_path):
            errors = open(errors_path, "w")  # earlier errors are retried
        with errors:
            self.errors = errors
            self.bar = self._progress_bar()
            usable = [r for r in todo if not r.problem or self._fail(r, r.problem)]
            self._open_encoders(usable)
            self._encode(usable)
            self.bar.close()
        return self._finish()

    def _work_left(self) -> list[Record]:
        """This rank's slice minus what complete shards already hold (of any rank); writes the progress file."""
        published = self.publisher.pull_progress() if self.publisher else None
        parts = shardio.all_parts(self.out)
        for other_rank, other in parts.items():
            if other["header"] != self.header:
                diff = sorted(k for k in set(self.header) | set(other["header"])
                              if self.header.get(k) != other["header"].get(k))
                raise CogvxError(
                    f"{self.out} holds shards made with other settings ({', '.join(diff)} differ from rank "
                    f"{other_rank}'s); use a new --out folder or the same settings")
        mine_before = parts.get(self.rank)
        own_shards = shardio.recover_rank_shards(self.out, self.rank, mine_before["shards"] if mine_before else [],
                                                 published)
        if self.publisher:
            self._republish(own_shards, published)
        done = {k for r, p in parts.items() if r != self.rank for e in p["shards"] for k in e.keys}
        done.update(k for e in own_shards for k in e.keys)
        self.mine = self.records[self.rank::self.world]  # disjoint, deterministic, balanced
        self.done_windows: dict[str, frozenset[int]] = {}
        """Records some of whose clips (by number) are already written (clips_per_video > 1)."""
        windows: dict[str, int] = {}
        if self.config.clips_per_video > 1:
            known = {k: n for p in parts.values() for k, n in p.get("windows", {}).items()}
            for record in self.mine:
                written = frozenset(w for w in range(known.get(record.key, self.config.clips_per_video))
                                    if shard_format.window_key(record.key, w) in done)
                if record.key in known:
                    windows[record.key] = known[record.key]
                if written:
                    self.done_windows[record.key] = written
            todo = [r for r in self.mine if len(self.done_windows.get(r.key, ())) != windows.get(r.key, -1)]
        else:
            todo = [r for r in self.mine if r.key not in done]
        self.already = len(self.mine) - len(todo)
        summaries = {name: summary for p in parts.values() for name, summary in p.get("summaries", {}).items()}
        self.part: dict[str, Any] = {
            "rank": self.rank, "world_size": self.world, "complete": False, "header": self.header,
            "settings": _settings(self.config), "inputs": len(self.mine), "shards": own_shards, "stats": {},
            "summaries": {},
        }
        for entry in own_shards:
            # A shard renamed but not recorded by a killed run (or recorded by a prep that kept no summaries) is
            # counted from its samples' JSON while it is here.
            if entry.name in summaries:
                self.part["summaries"][entry.name] = summaries[entry.name]
            elif (self.out / entry.name).is_file():
                self.part["summaries"][entry.name] = shardio.shard_summary(self.out / entry.name)
        if self.config.clips_per_video > 1:
            self.part["windows"] = windows
        self._save_part()
        if self.already:
            self.log.info("resuming: %d of %d inputs of rank %d are already in complete shards", self.already,
                          len(self.mine), self.rank)
        return todo

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=len(self.mine), initial=self.already, position=self.rank if self.world <= 16 else 0,
                    desc=f"prep r{self.rank}", unit="video", disable=not self.config.progress, dynamic_ncols=True,
                    mininterval=1.0, leave=True)

    def _fail(self, record: Record, reason: str) -> bool:
        """Record an input that cannot be used (errors file, count, progress); False, for filters."""
        self.failed += 1
        item = {"source": record.source, "video": record.video, "origin": record.origin, "reason": reason,
                "rank": self.rank}
        with shardio.writing(Path(self.errors.name)):
            self.errors.write(json.dumps(item, sort_keys=True) + "\n")
            self.errors.flush()
        self.bar.update(1)
        return False

    def _open_encoders(self, usable: list[Record]) -> None:
        from data_prep.encode import Encoders

        config = self.config
        self.device = pick_device(config.device, self.ranks.local_rank)
        if self.device.startswith("cuda:"):
            import torch

            torch.cuda.set_device(self.device)  # else every rank's CUDA context and kernels start on GPU 0
        compute = compute_dtype(config.compute_dtype, self.device)
        self.storage = torch_dtype(config.storage_dtype)
        self.encoders = Encoders(config.model, self.device, compute, slicing=config.vae_slicing,
                                 tiling=config.vae_tiling, channels_last=config.vae_channels_last,
                                 compile=config.vae_compile)
        own_shards = self.part["shards"]
        first_index = shardio.next_shard_index(self.out, self.rank, own_shards)
        self.writer = shardio.ShardWriter(self.out, self.rank, first_index, config.shard_max_bytes,
                                          config.shard_max_samples, self._on_shard)
        if usable:
            clips = f", up to {config.clips_per_video} clips a video" if config.clips_per_video > 1 else ""
            self.log.info("rank %d/%d (%s): %d to encode on %s (%s), %s frames, buckets %s%s", self.rank,
                          self.world, self.ranks.source, len(usable), self.device, compute,
                          " or ".join(map(str, self.frame_counts)), ", ".join(f"{h}x{w}" for h, w in self.buckets),
                          clips)

    def _republish(self, own_shards: list[shard_format.ShardEntry], published: dict[str, int]) -> None:
        """Output URL: upload this rank's shards finished locally but not yet uploaded (a crash in between), and
        delete those the store holds but no progress file lists (uploaded just before a crash)."""
        kept = {entry.name for entry in own_shards}
        for name in sorted(kept - set(published)):
            self.publisher.shard(name)
        for name in sorted(set(published) - kept):
            if name.startswith(f"shard-r{self.rank:05d}-"):
                self.publisher.delete(name)

    def _save_part(self) -> None:
        """Write this rank's progress file (and upload it, after the shards it lists, with an output URL)."""
        shardio.write_part(self.out, self.part)
        if self.publisher:
            self.publisher.file(shard_format.part_path(self.out, self.rank))

    def _on_shard(self, entry: shard_format.ShardEntry, summary: shardio.Summary) -> None:
        if self.publisher:
            self.publisher.shard(entry.name)
        self.part["shards"].append(entry)
        self.part["summaries"][entry.name] = summary
        self._save_part()

    def _encode(self, usable: list[Record]) -> None:
        """Per chunk of records: T5 for every prompt, T5 freed, then the VAE over clips decoded ahead by a pool."""
        config = self.config
        chunks = [usable[i : i + config.text_chunk] for i in range(0, len(usable), config.text_chunk)]
        self._write_empty_prompt()
        with ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="decode") as pool:
            for chunk_index, chunk in enumerate(chunks):
                if chunk_index:
                    self.encoders.release_vae()
                self._encode_chunk(pool, chunk)
        self.writer.close()
        self.encoders.release_vae()

    def _write_empty_prompt(self) -> None:
        """The dataset's empty-prompt embedding (for caption dropout), made once: by the first rank to find it
        missing (the text encoder loaded for it stays for the first chunk)."""
        name = shard_format.EMPTY_PROMPT_NAME
        there = name in self.publisher.store.listing() if self.publisher else (self.out / name).is_file()
        if there:
            return
        t0 = time.perf_counter()
        embedding = self.encoders.encode_prompts([""], self.family.text_max_length, 1, self.storage)[0][0]
        self.timings["t5_s"] += time.perf_counter() - t0
        with shardio.writing(self.out / name):
            shard_format.write_empty_prompt(self.out, embedding)
        if self.publisher:
            self.publisher.file(name)

    def _encode_chunk(self, pool: ThreadPoolExecutor, chunk: list[Record]) -> None:
        t0 = time.perf_counter()
        embeds, tokens = self.encoders.encode_prompts([self._prompt(r) for r in chunk], self.family.text_max_length,
                                                      self.config.text_batch_size, self.storage)
        self.encoders.release_text_encoder()
        self.timings["t5_s"] += time.perf_counter() - t0
        # The VAE batches hold clips of one bucket (and one frame count).
        embed_of = {r.key: (e, n) for r, e, n in zip(chunk, embeds, tokens)}
        pending: dict[tuple[int, int, int], list] = {}
        window = 2 * self.config.decode_workers + self.config.vae_batch_size
        several = self.config.clips_per_video > 1
        for record, future in _ordered_prefetch(pool, chunk, self._decode, window):
            t0 = time.perf_counter()
            try:
                count, clips, seconds = future.result()
            except BadInput as err:
                self.timings["decode_wait_s"] += time.perf_counter() - t0
                self._fail(record, str(err))
                continue
            self.timings["decode_wait_s"] += time.perf_counter() - t0
            self.timings["decode_s"] += seconds
            if several:  # saved with the next shard, before which none of these clips is in a complete shard
                self.part["windows"][record.key] = count
            embedding = embed_of.pop(record.key)
            for clip, image in clips:
                key = shard_format.window_key(record.key, clip.window) if several else record.key
                bucket = tuple(clip.frames.shape[:3])  # frames (a single image: 1), height, width
                pending.setdefault(bucket, []).append((record, key, clip, image, embedding))
                if len(pending[bucket]) >= self.config.vae_batch_size:
                    self._encode_batch(pending.pop(bucket))
            self.bar.update(1)
        for bucket in list(pending):
            self._encode_batch(pending.pop(bucket))

    def _prompt(self, record: Record) -> str:
        """What T5 encodes for a record: its caption in the prompt template."""
        return self.config.template().replace(PROMPT_SLOT, record.prompt)

    def _decode(self, record: Record) -> Decoded:
        return _decode_task(self.root, record, self.frame_counts, self.buckets, self.config, self.family.fps,
                            self.family.image_to_video, self.done_windows.get(record.key, frozenset()))

    def _encode_batch(self, batch: list[tuple[Record, str, Clip, np.ndarray | None, Any]]) -> None:
        import torch

        t0 = time.perf_counter()
        mean, logvar = self.encoders.encode_clips([clip.frames for _, _, clip, _, _ in batch])
        noised = self.family.image_to_video and self.config.image_noise_samples
        if self.family.image_to_video:
            image_mean, image_logvar = self.encoders.encode_clips([image for _, _, _, image, _ in batch])
        if noised:
            # Seeded by the sample's key: each clip of a video gets its own noise.
            noised_mean, noised_logvar, sigmas = self.encoders.encode_noised_images(
                [image for _, _, _, image, _ in batch], [key for _, key, _, _, _ in batch],
                self.config.image_noise_samples)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        self.timings["vae_s"] += t1 - t0
        for i, (record, key, clip, _, (embeds, tokens)) in enumerate(batch):
            tensors = {
                shard_format.LATENT_MEAN: mean[i].to(self.storage),
                shard_format.LATENT_LOGVAR: logvar[i].to(self.storage),
                shard_format.PROMPT_EMBEDS: embeds.to(self.storage),
            }
            self.truncated_prompts += tokens > self.family.text_max_length
            if self.family.image_to_video:
                tensors[shard_format.IMAGE_MEAN] = image_mean[i].to(self.storage)
                tensors[shard_format.IMAGE_LOGVAR] = image_logvar[i].to(self.storage)
            meta = _sample_meta(record, self._prompt(record), tokens, clip, self.config.clips_per_video > 1)
            if noised:
                tensors[shard_format.NOISED_IMAGE_MEAN] = noised_mean[i].to(self.storage)
                tensors[shard_format.NOISED_IMAGE_LOGVAR] = noised_logvar[i].to(self.storage)
                tensors[shard_format.IMAGE_NOISE_SIGMAS] = sigmas[i]
                meta["image_noise_sigmas"] = [round(float(sigma), 6) for sigma in sigmas[i]]
            self.writer.write(key, tensors, meta)
            self.encoded += 1
            if self.written_fault:
                self.writer.flush()
                self.written_fault(self.encoded)
        self.timings["write_s"] += time.perf_counter() - t1

    def _finish(self) -> PrepResult:
        """Mark this rank complete, judge its failures, and merge the manifest if every rank is done."""
        seconds = time.perf_counter() - self.started
        timings = {k: round(v, 3) for k, v in self.timings.items()}
        self.part["complete"] = True
        self.part["stats"] = {"encoded": self.encoded, "failed": self.failed, "already_done": self.already,
                              "truncated_prompts": self.truncated_prompts, "seconds": round(seconds, 3), **timings}
        if self.publisher:
            self.publisher.file(shard_format.rank_errors_path(self.out, self.rank))
        self._save_part()
        result = PrepResult(self.rank, self.world, len(self.mine), self.already, self.encoded, self.failed,
                            self.truncated_prompts, self.writer.shards_written, self.writer.bytes_written, seconds,
                            timings)
        self.log.info(summary_line(result))
        if self.truncated_prompts:
            self.log.warning("rank %d: %d of %d prompts are longer than the %d tokens %s reads and were cut there "
                             "(as the CogVideoX pipeline cuts them); each sample's JSON has its prompt_tokens",
                             self.rank, self.truncated_prompts, self.encoded, self.family.text_max_length,
                             self.family.name)
        limit = self.config.max_failed_fraction
        # The limit is on the whole job's inputs. A rank cannot see the other ranks' failures, so it fails on its
        # own only when its failures alone pass the job's limit (skewed bad inputs on one slice must not fail a job
        # that is under it); the merge judges the job as a whole.
        if self.records and self.failed / len(self.records) > limit:
            result.exit_code = 1
            self.log.info("rank %d: %d failed inputs of this rank alone are more than max_failed_fraction %g of the "
                          "job's %d inputs (reasons in %s)", self.rank, self.failed, limit, len(self.records),
                          shard_format.rank_errors_path(self.out, self.rank))
        self._merge(result)
        return result

    def _merge(self, result: PrepResult) -> None:
        """Under MPI rank 0 merges after a barrier; otherwise whichever process sees every rank complete."""
        self.ranks.barrier()
        if self.ranks.comm is not None and self.rank != 0:
            return
        published = self.publisher.pull_progress() if self.publisher else None
        _, missing, _ = shardio.parts_status(self.out)
        if missing:
            self.log.info("rank(s) %s still running; the last to finish (or `cogvx prep finalize %s`) writes the "
                          "manifest", ", ".join(map(str, missing)), self.config.out)
            return
        manifest, inputs = shardio.finalize(self.out, published)
        if self.publisher:
            self.publisher.dataset()
        result.manifest = f"{str(self.config.out).rstrip('/')}/{shard_format.MANIFEST_NAME}"
        result.job_inputs, result.job_skipped = inputs, manifest.skipped
        self.log.info(finalize_line(self.config.out, manifest, inputs))
        cropped = shardio.crop_line(manifest)
        if cropped:
            self.log.warning(cropped)
        if inputs and manifest.skipped / inputs > self.config.max_failed_fraction:
            result.exit_code = 1
            self.log.info("%d of %d inputs failed, more than max_failed_fraction %g (reasons in %s)",
                          manifest.skipped, inputs, self.config.max_failed_fraction,
                          self.out / shard_format.ERRORS_NAME)


def run_prep(config: PrepConfig, ranks: RankInfo | None = None) -> PrepResult:
    """Run this process's share of a prep job (and merge the manifest when this process is the last or rank 0)."""
    return PrepJob(config, ranks).run()


def _settings(config: PrepConfig) -> dict[str, Any]:
    """The prep settings recorded with the shards (provenance; not part of what ranks must agree on)."""
    keys = ("target_fps", "frame_stride", "vae_tiling", "vae_slicing", "vae_channels_last", "vae_compile",
            "storage_dtype", "compute_dtype", "layout", "max_failed_fraction")
    return {**{k: v for k, v in asdict(config).items() if k in keys}, "data": str(config.data)}


def _sample_meta(record: Record, prompt: str, prompt_tokens: int, clip: Clip, several: bool = False) -> dict[str, Any]:
    """The JSON member of a sample: what it is (the prompt T5 encoded, its token count before the cut at the text
    length, and the caption it was made from) and where it came from (with `several` clips a video: which clip, of
    how many, from which second)."""
    meta = {
        "prompt": prompt, "prompt_tokens": prompt_tokens, "caption": record.prompt, "source": record.source,
        "video": record.video,
        "image": record.image,
        "frames": int(clip.frames.shape[0]), "height": int(clip.frames.shape[1]), "width": int(clip.frames.shape[2]),
        "fps": round(clip.fps, 4), "source_fps": round(clip.source_fps, 4), "stride": round(clip.stride, 4),
        "source_size": list(clip.source_size),
    }
    if clip.rotation:
        # Only when turned: the JSON (and so the shards' bytes and digests) of an upright clip stays as it was.
        meta["rotation_degrees"] = clip.rotation
    if several:
        meta.update(window=clip.window + 1, windows=clip.windows, start_seconds=clip.start)
    return meta


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


def finalize_line(out: str | Path, manifest: shard_format.Manifest, inputs: int) -> str:
    """One line after the merge."""
    total = sum(s.bytes for s in manifest.shards)
    return (f"wrote {str(out).rstrip('/')}/{shard_format.MANIFEST_NAME}: {manifest.num_samples} samples in "
            f"{len(manifest.shards)} shards ({total} bytes), {manifest.skipped} of {inputs} inputs skipped")
