"""The training run on one rank: build, restore, then for each optimizer step: micro-batches (loss, backward), one
agreement of all ranks (loss, finiteness, preemption, bad samples), the update, log, maybe save; at the end export
the adapter.

Everything a rank does is a function of (seed, step, micro-step, rank), so a resume is bit-exact and ranks agree
without talking; they still compare adapter checksums at start and end. What a step computes is in train/step/,
where its samples come from in train/data/, how state reaches and leaves the run folder in train/checkpointer.py,
and what ends a rank early in train/guards.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from cogvx_dist.core.config_files import to_dict
from cogvx_dist.core.devices import pick_device, share_cpu_cores, torch_dtype
from cogvx_dist.core.errors import CogvxError, RankError
from cogvx_dist.core.faults import delay_hook, fault_hook
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.launch_env import RankInfo, env_rank, env_world_size
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.process import resume_garbage_collection
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.core.shard_format import LATENT_MEAN
from cogvx_dist.train import engine, membership, records
from cogvx_dist.train.build import DataRank, build_parts
from cogvx_dist.train.checkpointer import Checkpointer
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.data.mixture import MixedIndex
from cogvx_dist.train.data.reader import BatchSplit, MicroBatches, make_loader
from cogvx_dist.train.data.streaming import StreamingMicroBatches
from cogvx_dist.train.ds_config import optimizer_in_use, zero_stage
from cogvx_dist.train.guards import RunGuards
from cogvx_dist.train.memory.runs import PLAN_CHECKED_ENV, check_run_memory, resolve_checkpointing
from cogvx_dist.train.metrics import MetricsWriter, SampleTrace, StepMeter
from cogvx_dist.train.preflight import Preflight, check_batch_fits, preflight
from cogvx_dist.train.step.flops import SampleCosts, peak_flops
from cogvx_dist.train.step.loss import CAPTION_DROPPED, StepDraws, diffusion_loss, drop_captions
from cogvx_dist.train.step.model import forbid_encoders


def train(config: RunConfig) -> dict[str, Any]:
    """Run training on this rank (called on every rank by the launcher); returns the run summary.

    Leaves the process group cleanly only on success: an exception propagates without any collective, so a rank
    that fails never waits for the others (the entry point then exits at once, and the launcher ends the rest)."""
    threads = share_cpu_cores()
    if threads and env_rank() == 0:
        rank_logger("cogvx.train", 0).info("CPU ranks: %d torch threads each (the node's cores shared; "
                                           "OMP_NUM_THREADS chooses)", threads)
    config = config.at_world(env_world_size())  # an elastic restart may bring another world size
    checks = preflight(config)
    config, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config,
                                        env_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if why and env_rank() == 0:
        rank_logger("cogvx.train", 0).info("%s", why)
    check_memory_on_rank_zero(config, checks)
    forbid_encoders()
    ranks = engine.init_distributed(config.distributed.timeout_s)
    with RunGuards(config, ranks) as guards:
        summary = Trainer(config, checks, ranks, guards).fit()
    engine.shutdown()
    return summary


def check_memory_on_rank_zero(config: RunConfig, checks: Preflight) -> None:
    """The planner's memory check, on global rank 0 before the process group exists: the other ranks wait for it
    in the rendezvous, so no rank loads weights for a run predicted not to fit. `cogvx train` may have done it."""
    if env_rank() != 0 or os.environ.get(PLAN_CHECKED_ENV):
        return
    line = check_run_memory(config, checks.checkpoint, checks.manifest, checks.ds_config, env_world_size(),
                            local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if line:
        rank_logger("cogvx.train", 0).info("%s", line)


@dataclass
class Agreement:
    """What all ranks learned at the end of a step's micro-batches, from one all-reduce."""

    loss: torch.Tensor
    """The mean loss over micro-batches and ranks (a device tensor; reading it waits for the device)."""
    nonfinite_ranks: int
    """Ranks whose loss was not finite."""
    preempt: bool
    """Some rank was asked to stop."""
    bad_samples: int
    """Bad samples all ranks skipped in this step."""
    nonfinite_here: bool
    """This rank's own loss was not finite."""
    save_due: bool = False
    """checkpoint.every_minutes passed on rank 0's clock since its last save."""
    tokens: float = 0.0
    """Tokens the step trained over all ranks, each sample counted at its own bucket's size."""
    flops: float = 0.0
    """Model FLOPs of the step over all ranks, counted alike."""
    samples: float = 0.0
    """Samples the step trained over all ranks (the global batch, unless a token budget sizes micro-batches)."""


class Trainer:
    """One rank's training run: constructing it builds the model and restores the resume point; `fit` trains."""

    def __init__(self, config: RunConfig, checks: Preflight, ranks: RankInfo, guards: RunGuards) -> None:
        self.config = config
        self.checks = checks
        self.ranks = ranks
        self.guards = guards
        self.run = RunFolder(config.output_dir)
        self.log = rank_logger("cogvx.train", ranks.rank)
        self.device = torch.device(pick_device("auto", ranks.local_rank))
        self.dtype = torch_dtype(config.model.dtype)
        self.global_batch = check_batch_fits(config, checks.manifest, ranks.world_size)
        parts = config.parallel.sequence_parallel
        self.sequence_groups = engine.SequenceGroups(parts, config.distributed.timeout_s) if parts > 1 else None
        groups = self.sequence_groups
        self.data = (DataRank(groups.data_rank, groups.data_size, groups.index == 0) if groups
                     else DataRank(ranks.rank, ranks.world_size, True))
        self.family = checks.checkpoint.family
        self.committed_fault = fault_hook("train.committed")
        self.slow_step = delay_hook("train.step_delay_ms")
        self._write_run_files()
        self.parts = build_parts(config, checks, ranks, self.data, self.sequence_groups, self.device, self.dtype)
        self.engine = self.parts.engine
        guards.progress(0)
        self.checkpointer = Checkpointer(config, checks.ds_config, ranks, self.engine, self.parts.lora_names,
                                         self.parts.ema, self.family.name)
        reached = membership.last_logged_step(self.run.root) if ranks.is_main else 0  # the restore drops redone rows
        resumed = self.checkpointer.restore()
        if ranks.is_main:
            membership.record_launch(self.run.root, ranks.world_size, resumed.step, reached)
        self.start_step, self.position = resumed.step, resumed.position
        """The step the run goes on from and the global sample position reached."""
        self.bad_samples, self.skipped_steps = resumed.bad_samples, resumed.skipped_steps
        self.nonfinite_in_a_row = 0
        self.saved_at = time.monotonic()
        """When this rank last saved (or started): checkpoint.every_minutes counts from it on rank 0."""
        self.draws, self.loader = self._micro_batches()
        self.costs = SampleCosts(self.family, checks.checkpoint.transformer_config, config.lora)
        """Tokens and FLOPs of a sample by its latent shape."""
        self.meter = self._step_meter()

    def fit(self) -> dict[str, Any]:
        """Train from the resume point to train.max_steps; returns the run summary (Preempted on a signal)."""
        config = self.config
        metrics = MetricsWriter.for_run(config, enabled=self.ranks.is_main, resume_step=self.start_step)
        trace = SampleTrace(self.run.root, self.ranks.rank) if config.log.sample_trace else None
        progress = self._progress_bar()
        resume_garbage_collection()
        if self.start_step == 0 and self.parts.held_out is not None:
            metrics.log(0, self.evaluate())  # where the curve starts: the weights before any update
        self.engine.train()
        for step in range(self.start_step + 1, config.train.max_steps + 1):
            lr = self.engine.lr()  # the rate this step's update uses
            agreed = self.train_step(step, trace)
            self.position += self.global_batch
            if self.slow_step:
                self.slow_step()
            self.meter.step_done(None if agreed.nonfinite_ranks else agreed.loss, agreed.tokens, agreed.flops,
                                 agreed.samples)
            self.guards.progress(step)
            progress.update(1)
            last = step == config.train.max_steps
            evaluated = self.evaluate() if self._evaluates(step) else {}
            if step % config.log.every_steps == 0 or last or evaluated:
                values = self._log_values(lr, evaluated)
                metrics.log(step, values)
                progress.set_postfix(loss=f"{values['loss'] or float('nan'):.4f}",
                                     samples_s=f"{values['samples_per_s']:.2f}")
            if step % config.checkpoint.every_steps == 0 or last or agreed.preempt or agreed.save_due:
                self.save(step)
            if agreed.preempt and not last:
                self.guards.stop_preempted(step)
        progress.close()
        metrics.close()
        if trace is not None:
            trace.close()
        return self._finish()

    def train_step(self, step: int, trace: SampleTrace | None) -> Agreement:
        """One optimizer step over grad_accum_steps micro-batches; the ranks agree on its loss, finiteness,
        preemption and bad samples before the update (that all-reduce is the step's one host sync)."""
        losses, keys, bad, cost = [], [], 0, [0.0, 0.0, 0.0]
        for micro_step in range(self.config.train.grad_accum_steps):
            batch = self.meter.next_batch(self.loader)
            if "failure" in batch:
                raise RankError(batch["failure"])
            if self.data.reports_samples:
                bad += records.note_bad_samples(self.run, step, self.ranks.rank, batch.get("bad", []))
            keys += batch["keys"]
            tokens, flops = self.costs.of(batch[LATENT_MEAN].shape)
            cost = [cost[0] + tokens * len(batch["keys"]), cost[1] + flops * len(batch["keys"]),
                    cost[2] + len(batch["keys"])]
            if trace is not None:
                trace.write(step, micro_step, batch["keys"])
            drawn = batch.get("randomness") or self.draws.for_step(batch, step, micro_step)  # streaming: here
            if CAPTION_DROPPED in drawn:
                batch = drop_captions(batch, self.checks.empty_prompt, drawn[CAPTION_DROPPED])
            with self.parts.attention():  # backward too: checkpointed blocks recompute their attention there
                loss = diffusion_loss(self.engine, batch, self.parts.context, drawn, self.device, self.dtype)
                self.engine.backward(loss)
            losses.append(loss.detach())
        agreed = self._agree(torch.stack(losses).mean(), bad, cost)
        self.engine.step()
        if self.parts.ema is not None:
            self.parts.ema.update(self.engine.local_chunks(self.parts.lora_names))
        self._account(step, agreed, keys)
        return agreed

    def _agree(self, local_loss: torch.Tensor, bad: int, cost: list[float]) -> Agreement:
        nonfinite = ~torch.isfinite(local_loss)
        every = self.config.checkpoint.every_minutes * 60  # rank 0's clock alone decides, so all ranks save together
        due = self.ranks.is_main and every > 0 and time.monotonic() - self.saved_at >= every
        flags = torch.tensor([float(self.guards.preemption.requested), float(bad), float(due), *cost],
                             device=local_loss.device)
        reduced = engine.all_reduce_sum(torch.cat([local_loss.float().view(1), nonfinite.float().view(1), flags]))
        counts = reduced[1:].tolist()
        # Each data-parallel group's ranks hold parts of its loss (one rank the whole without sequence parallelism).
        # A sequence-parallel group's ranks all hold its samples: count them once.
        holders = self.ranks.world_size // self.data.size
        return Agreement(reduced[0] / self.data.size, int(counts[0]), counts[1] > 0, int(counts[2]), bool(nonfinite),
                         counts[3] > 0, counts[4] / holders, counts[5] / holders, counts[6] / holders)

    def _account(self, step: int, agreed: Agreement, keys: list[str]) -> None:
        """Non-finite steps, bad samples and preemption requests, as the ranks agreed them."""
        if agreed.preempt and not self.guards.preemption.requested:
            self.guards.preemption.request("a signal to another rank")  # start this rank's grace period too
        self.bad_samples += agreed.bad_samples
        read = max(step * self.global_batch, len(self.checks.index or []))
        if self.bad_samples / read > self.config.data.max_bad_fraction:
            raise CogvxError(f"{self.bad_samples} bad samples skipped by step {step}: more than data.max_bad_fraction "
                             f"{self.config.data.max_bad_fraction:g} of those read (see {self.run.bad_samples})")
        if not agreed.nonfinite_ranks:
            self.nonfinite_in_a_row = 0
            return
        gathered = engine.all_gather_object((self.ranks.rank, agreed.nonfinite_here, keys))
        offenders = [(rank, ks) for rank, nonfinite, ks in gathered if nonfinite]
        where = "; ".join(f"rank {rank} (samples {', '.join(ks)})" for rank, ks in offenders)
        if self.config.train.on_nonfinite == "fail":
            raise CogvxError(f"non-finite loss at step {step} on {where}; the last complete checkpoint is intact "
                             "(train.on_nonfinite: skip_step goes on without the update)")
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        self.log.warning("step %d skipped on every rank: non-finite loss on %s%s", step, where,
                         "" if not self.engine.step_applied() else " (DeepSpeed applied it regardless)")
        if self.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
            raise CogvxError(f"{self.nonfinite_in_a_row} non-finite steps in a row (up to step {step}; "
                             f"train.max_nonfinite_steps {self.config.train.max_nonfinite_steps}): last on {where}")

    def _log_values(self, lr: float, evaluated: dict[str, float]) -> dict[str, Any]:
        """The metrics of a log step: the meter's window, the held-out loss and the run's counters."""
        values = {**self.meter.values(lr, self.engine.grad_norm(), self.position), **evaluated}
        values.update(bad_samples=self.bad_samples, skipped_steps=self.skipped_steps, world_size=self.ranks.world_size,
                      attention=self.parts.attention_name, sequence_parallel=self.config.parallel.sequence_parallel)
        if isinstance(self.checks.index, MixedIndex):
            values.update(self.checks.index.seen(self.position, self.config.train.seed))
        return values

    def _evaluates(self, step: int) -> bool:
        every = self.config.log.eval_every_steps
        return self.parts.held_out is not None and (step % every == 0 or step == self.config.train.max_steps)

    def evaluate(self) -> dict[str, float]:
        """Collective: the held-out loss of the current weights (its time is kept out of the throughput)."""
        started = time.perf_counter()
        self.engine.eval()
        with self.parts.attention():
            sums = self.parts.held_out.local_sums(self.engine, self.parts.context, self.device, self.dtype)
        values = self.parts.held_out.values(engine.all_reduce_sum(sums))
        self.engine.train()
        self.meter.exclude(time.perf_counter() - started)
        return values

    def save(self, step: int) -> None:
        """Collective: commit a checkpoint of `step` (unless it is the one just saved or resumed from)."""
        if self.checkpointer.save(step, self.position, self.bad_samples, self.skipped_steps):
            self.guards.progress(step)
            if self.committed_fault:
                self.committed_fault(step)
        self.saved_at = time.monotonic()  # the next interval starts when this save is done

    def _finish(self) -> dict[str, Any]:
        """Check the ranks ended with the same adapter, export it and write the summary."""
        final, checksums = self.checkpointer.final_adapter()
        summary = {
            "steps": self.config.train.max_steps,
            "resumed_from_step": self.start_step,
            "samples_seen": self.position,
            "world_size": self.ranks.world_size,
            "zero_stage": zero_stage(self.checks.ds_config),
            "adapter_checksums": checksums,
            "initial_adapter_checksum": self.parts.initial_checksum,
            "family": self.family.name,
            "bad_samples": self.bad_samples,
            "skipped_steps": self.skipped_steps,
        }
        self.checkpointer.export_final(final, summary)
        if self.ranks.is_main:
            self.log.info("done: %d steps, adapter %s, exported to %s", self.config.train.max_steps, checksums[0][:12],
                          self.run.lora)
        return summary

    def _step_meter(self) -> StepMeter:
        """Throughput and MFU of the steps between log lines (tokens and FLOPs come from each step's samples)."""
        config = self.config
        peak = None
        if self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device), config.log.peak_tflops)
            self.log.info("MFU against %s", f"{peak / 1e12:g} TFLOP/s" if peak else "nothing: unknown GPU (set "
                          "log.peak_tflops)")
        return StepMeter(self.global_batch, self.device, self.ranks.world_size, peak)

    def _micro_batches(self) -> tuple[StepDraws, Any]:
        """This rank's random draws and micro-batches from the resume point on (local shards: the draws are made in
        the loader; streamed: the step makes them)."""
        config = self.config
        dropout = config.train.caption_dropout if self.checks.empty_prompt is not None else 0.0
        draws = StepDraws(self.parts.context, config.train.seed, self.data.rank, config.train.grad_accum_steps,
                          self.start_step + 1, dropout, self.data.size)
        if self.checks.index is not None:
            split = BatchSplit(config.train.micro_batch_size, config.train.grad_accum_steps, self.data.rank,
                               self.data.size)
            steps_left = max(0, config.train.max_steps - self.start_step)
            batches = MicroBatches(self.checks.index, split, config.train.seed, self.position, steps_left,
                                   config.data.on_bad_sample, draws, config.train.micro_batch_tokens)
        else:
            batches = StreamingMicroBatches(config.data.shards, self.checks.manifest, config.train.micro_batch_size,
                                            config.train.seed, self.data.rank, self.start_step)
        on_gpu = self.device.type == "cuda"
        workers = config.data.num_workers if config.data.num_workers is not None else int(on_gpu)
        return draws, iter(make_loader(batches, workers, pin_memory=on_gpu))

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=self.start_step, desc="train", unit="step",
                    disable=not (self.ranks.is_main and self.config.log.progress_bar), dynamic_ncols=True)

    def _write_run_files(self) -> None:
        if self.ranks.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run.run_config, json.dumps(to_dict(self.config), indent=2) + "\n")
            write_atomic(self.run.ds_config, json.dumps(self.checks.ds_config, indent=2) + "\n")
        for warning in self.checks.warnings:
            self.log.warning("%s", warning)
        parallel = (f" (sequence-parallel groups of {self.config.parallel.sequence_parallel}, {self.data.size} "
                    "data-parallel)" if self.sequence_groups else "")
        self.log.info("%d ranks%s on %s, %s, ZeRO-%d, %s, global batch %d, %d samples (%s)", self.ranks.world_size,
                      parallel, self.device.type, self.config.model.dtype, zero_stage(self.checks.ds_config),
                      optimizer_in_use(self.checks.ds_config), self.global_batch, self.checks.manifest.num_samples,
                      self.family.name)
