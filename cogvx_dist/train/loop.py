"""The training run on one rank: build the run, restore, make batches, then for each optimizer step: micro-batches
(loss, backward), one agreement of all ranks (loss, finiteness, preemption, bad samples), the update, log, maybe
save; at the end export the adapter.

Everything a rank does is a function of (seed, step, micro-step, rank), so a resume is bit-exact and ranks agree
without talking; they still compare adapter checksums at start and end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.config_files import to_dict
from cogvx_dist.core.devices import pick_device, share_cpu_cores, torch_dtype
from cogvx_dist.core.errors import CogvxError, RankError, first_line
from cogvx_dist.core.faults import delay_hook, fault_hook
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.launch_env import RankInfo, env_rank, env_world_size, resume_garbage_collection
from cogvx_dist.core.loading import load_scheduler
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.lora import (
    adapter_checksum,
    export_lora,
    load_exported_lora,
    lora_parameters,
    lora_state_dict,
    memory_names,
    state_dict_names,
)
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import checkpoints, engine, failures, records
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.ds_config import ADAM_TYPES, offloads_optimizer, optimizer_in_use, optimizer_type, zero_stage
from cogvx_dist.train.ema import AdapterEMA
from cogvx_dist.train.evaluation import HeldOutLoss
from cogvx_dist.train.step.flops import peak_flops, training_flops_per_sample
from cogvx_dist.train.step.loss import CAPTION_DROPPED, LossContext, StepDraws, diffusion_loss, drop_captions
from cogvx_dist.train.metrics import MetricsWriter, SampleTrace, StepMeter
from cogvx_dist.train.data.mixture import MixedIndex
from cogvx_dist.train.step.model import (
    attention_kernels,
    build_model,
    check_attention,
    choose_attention,
    forbid_encoders,
)
from cogvx_dist.train.preemption import PreemptionFlag, exit_now
from cogvx_dist.train.preflight import Preflight, check_batch_fits, preflight
from cogvx_dist.train.data.reader import BatchPlan, MicroBatches, make_loader
from cogvx_dist.train.run_lock import RunLock
from cogvx_dist.train.memory.runs import PLAN_CHECKED_ENV, check_run_memory, resolve_checkpointing
from cogvx_dist.train.schedule import lr_lambda
from cogvx_dist.train.step.sequence_parallel import enable_sequence_parallel
from cogvx_dist.train.data.streaming import StreamingMicroBatches
from cogvx_dist.train.watchdog import Watchdog, register_stack_dump

LAYOUT_NAMES = {"world_size": "world size", "sequence_parallel": "sequence parallelism", "zero_stage": "ZeRO stage",
                "dtype": "model.dtype", "optimizer_offload": "optimizer offload", "optimizer": "optimizer"}
"""The keys of a checkpoint's layout (`Trainer._layout`), as the resume warning names them."""


def train(config: RunConfig) -> dict[str, Any]:
    """Run training on this rank (called on every rank by the launcher); returns the run summary.

    Leaves the process group cleanly only on success: an exception propagates without any collective, so a rank
    that fails never waits for the others (the entry point then exits at once, and the launcher ends the rest)."""
    threads = share_cpu_cores()
    if threads and env_rank() == 0:
        rank_logger("cogvx.train", 0).info("CPU ranks: %d torch threads each (the node's cores shared; "
                                           "OMP_NUM_THREADS chooses)", threads)
    checks = preflight(config)
    config, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config,
                                        env_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if why and env_rank() == 0:
        rank_logger("cogvx.train", 0).info("%s", why)
    check_memory_on_rank_zero(config, checks)
    forbid_encoders()
    ranks = engine.init_distributed(config.distributed.timeout_s)
    summary = Trainer(config, checks, ranks).fit()
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


class Trainer:
    """One rank's training run."""

    def __init__(self, config: RunConfig, checks: Preflight, ranks: RankInfo) -> None:
        self.config = config
        self.checks = checks
        self.ranks = ranks
        self.run = RunFolder(config.output_dir)
        self.log = rank_logger("cogvx.train", ranks.rank)
        self.device = torch.device(pick_device("auto", ranks.local_rank))
        self.dtype = torch_dtype(config.model.dtype)
        self.global_batch = check_batch_fits(config, checks.manifest, ranks.world_size)
        parts = config.parallel.sequence_parallel
        self.sequence_groups = engine.SequenceGroups(parts, config.distributed.timeout_s) if parts > 1 else None
        groups = self.sequence_groups
        self.data_rank, self.data_size = (groups.data_rank, groups.data_size) if groups else (ranks.rank,
                                                                                              ranks.world_size)
        """The reader's and the random draws' rank: ranks sharing a sample's tokens read and draw alike."""
        self.reports_samples = groups is None or groups.index == 0
        """This rank speaks for its sequence-parallel group about the samples it read (bad ones, held-out counts)."""
        self.family = checks.checkpoint.family
        self.committed_fault = fault_hook("train.committed")
        self.slow_step = delay_hook("train.step_delay_ms")
        self.slow_preemption_record = delay_hook("train.preemption_record_delay_ms")
        self.lock = RunLock(config.output_dir)
        self.nonfinite_in_a_row = self.skipped_steps = self.bad_samples = 0
        self.saved_step = -1

    def fit(self) -> dict[str, Any]:
        """Train from the resume point to train.max_steps; returns the run summary (Preempted on a signal)."""
        try:
            self._start_guards()
            return self._fit()
        finally:
            if hasattr(self, "preemption"):
                self.preemption.cancel()
            if hasattr(self, "watchdog"):
                self.watchdog.stop()
            self.lock.release()

    def _fit(self) -> dict[str, Any]:
        config = self.config
        self._write_run_files()
        self._build()
        start_step, position = self._restore()
        loader = self._micro_batches(start_step, position)
        meter = self._step_meter()
        metrics = MetricsWriter(self.run.root, enabled=self.ranks.is_main, tensorboard=config.log.tensorboard,
                                resume_step=start_step)
        trace = SampleTrace(self.run.root, self.ranks.rank) if config.log.sample_trace else None
        progress = self._progress_bar(start_step)
        resume_garbage_collection()
        if start_step == 0 and self.held_out is not None:
            metrics.log(0, self.evaluate(meter))  # where the curve starts: the weights before any update
        self.engine.train()
        for step in range(start_step + 1, config.train.max_steps + 1):
            lr = self.engine.lr()  # the rate this step's update uses
            agreed = self.train_step(step, loader, meter, trace)
            position += self.global_batch
            if self.slow_step:
                self.slow_step()
            meter.step_done(None if agreed.nonfinite_ranks else agreed.loss)
            self.watchdog.progress(step)
            progress.update(1)
            last = step == config.train.max_steps
            evaluated = self.evaluate(meter) if self._evaluates(step) else {}
            if step % config.log.every_steps == 0 or last or evaluated:
                values = {**meter.values(lr, self.engine.grad_norm(), position), **evaluated}
                values.update(bad_samples=self.bad_samples, skipped_steps=self.skipped_steps,
                              attention=self.attention_name, sequence_parallel=config.parallel.sequence_parallel)
                if isinstance(self.checks.index, MixedIndex):
                    values.update(self.checks.index.seen(position, config.train.seed))
                metrics.log(step, values)
                progress.set_postfix(loss=f"{values['loss'] or float('nan'):.4f}",
                                     samples_s=f"{values['samples_per_s']:.2f}")
            if step % config.checkpoint.every_steps == 0 or step == config.train.max_steps or agreed.preempt:
                self.save(step, position)
            if agreed.preempt and step < config.train.max_steps:
                self._stop_preempted(step)
        progress.close()
        metrics.close()
        if trace is not None:
            trace.close()
        return self._finish(start_step, position)

    def train_step(self, step: int, loader: Any, meter: StepMeter, trace: SampleTrace | None) -> Agreement:
        """One optimizer step over grad_accum_steps micro-batches; the ranks agree on its loss, finiteness,
        preemption and bad samples before the update (that all-reduce is the step's one host sync)."""
        accumulation = self.config.train.grad_accum_steps
        losses, keys, bad = [], [], 0
        for micro_step in range(accumulation):
            batch = meter.next_batch(loader)
            if "failure" in batch:
                raise RankError(batch["failure"])
            if self.reports_samples:
                bad += records.note_bad_samples(self.run, step, self.ranks.rank, batch.get("bad", []))
            keys += batch["keys"]
            if trace is not None:
                trace.write(step, micro_step, batch["keys"])
            drawn = batch.get("randomness") or self.draws.for_step(batch, step, micro_step)  # streaming: here
            if CAPTION_DROPPED in drawn:
                batch = drop_captions(batch, self.checks.empty_prompt, drawn[CAPTION_DROPPED])
            with self.attention():  # backward too: checkpointed blocks recompute their attention there
                loss = diffusion_loss(self.engine, batch, self.context, drawn, self.device, self.dtype)
                self.engine.backward(loss)
            losses.append(loss.detach())
            if micro_step < accumulation - 1:
                self.engine.step()
        agreed = self._agree(torch.stack(losses).mean(), bad)
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.local_chunks(self.lora_names))
        self._account(step, agreed, keys)
        return agreed

    def _step_meter(self) -> StepMeter:
        """Throughput counted at the dataset's clip size (its first resolution bucket)."""
        geometry, config = self.checks.manifest, self.config
        shape = (geometry.frames, geometry.height, geometry.width)
        flops = training_flops_per_sample(self.family, self.checks.checkpoint.transformer_config, *shape,
                                          config.lora)
        peak = None
        if self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device), config.log.peak_tflops)
            self.log.info("MFU against %s", f"{peak / 1e12:g} TFLOP/s" if peak else "nothing: unknown GPU (set "
                          "log.peak_tflops)")
        return StepMeter(self.global_batch, self.family.tokens_per_sample(*shape), self.device, flops,
                         self.ranks.world_size, peak)

    def _evaluates(self, step: int) -> bool:
        every = self.config.log.eval_every_steps
        return self.held_out is not None and (step % every == 0 or step == self.config.train.max_steps)

    def evaluate(self, meter: StepMeter) -> dict[str, float]:
        """Collective: the held-out loss of the current weights (its time is kept out of the throughput)."""
        started = time.perf_counter()
        self.engine.eval()
        with self.attention():
            sums = self.held_out.local_sums(self.engine, self.context, self.device, self.dtype)
        values = self.held_out.values(engine.all_reduce_sum(sums))
        self.engine.train()
        meter.exclude(time.perf_counter() - started)
        return values

    def _agree(self, local_loss: torch.Tensor, bad: int) -> Agreement:
        self.local_nonfinite = ~torch.isfinite(local_loss)
        flags = torch.tensor([float(self.preemption.requested), float(bad)], device=local_loss.device)
        reduced = engine.all_reduce_sum(torch.cat([local_loss.float().view(1), self.local_nonfinite.float().view(1),
                                                   flags]))
        counts = reduced[1:].tolist()
        # Each data-parallel group's ranks hold parts of its loss (one rank the whole without sequence parallelism).
        return Agreement(reduced[0] / self.data_size, int(counts[0]), counts[1] > 0, int(counts[2]))

    def _account(self, step: int, agreed: Agreement, keys: list[str]) -> None:
        """Non-finite steps, bad samples and preemption requests, as the ranks agreed them."""
        if agreed.preempt and not self.preemption.requested:
            self.preemption.request("a signal to another rank")  # start this rank's grace period too
        self.bad_samples += agreed.bad_samples
        read = max(step * self.global_batch, len(self.checks.index or []))
        if self.bad_samples / read > self.config.data.max_bad_fraction:
            raise CogvxError(f"{self.bad_samples} bad samples skipped by step {step}: more than data.max_bad_fraction "
                             f"{self.config.data.max_bad_fraction:g} of those read (see {self.run.bad_samples})")
        if not agreed.nonfinite_ranks:
            self.nonfinite_in_a_row = 0
            return
        gathered = engine.all_gather_object((self.ranks.rank, bool(self.local_nonfinite), keys))
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

    def _start_guards(self) -> None:
        """The run lock (rank 0), stack dumps on SIGUSR2, the preemption signals and the stall watchdog."""
        config = self.config
        self.preemption = PreemptionFlag(config.checkpoint.preempt_signals, config.checkpoint.preempt_grace_s,
                                         self._preempt_deadline)
        if self.ranks.is_main:
            self.lock.acquire()
        failures.clear_failures(self.run.root, self.ranks.rank)
        self.stack_file = register_stack_dump(self.run.root, self.ranks.rank)
        self.watchdog = Watchdog(self.run.root, self.ranks.rank, self.ranks.world_size,
                                 config.distributed.stall_timeout_s, self._stalled, self._peer_failed,
                                 tick=self.lock.refresh).start()

    def _preempt_deadline(self, signal_name: str) -> None:
        message = (f"preempted by {signal_name}, but no checkpoint committed within checkpoint.preempt_grace_s "
                   f"{self.config.checkpoint.preempt_grace_s:g}; resume takes the last committed one")
        self._die(message, failures.EXIT_PREEMPT_UNSAVED)

    def _stalled(self, message: str, kill_lagging: Callable[[], None]) -> None:
        self._die(message, failures.EXIT_STALLED, before_exit=kill_lagging)

    def _peer_failed(self, record: dict[str, Any]) -> None:
        self._die(f"stopped: rank {record.get('rank')} failed ({record.get('message', '')[:200]})",
                  failures.EXIT_FAILED, failures.SECONDARY)

    def _die(self, message: str, code: int, kind: str = failures.PRIMARY,
             before_exit: Callable[[], None] | None = None) -> None:
        """From a watchdog or timer thread: record why, say it, and leave at once."""
        failures.claim_rank_end()
        failures.record_failure(self.run.root, self.ranks.rank, message, code, kind)
        self.log.error("[rank %d] %s", self.ranks.rank, message)
        if before_exit is not None:
            before_exit()
        self.lock.release()
        exit_now(code)

    def _stop_preempted(self, step: int) -> None:
        if self.ranks.is_main:
            if self.slow_preemption_record:
                self.slow_preemption_record()
            failures.record_preemption(self.run.root, step, self.preemption.signal_name)
        # No rank leaves before the record exists: another node's `cogvx train` reads it as soon as that node's
        # ranks are gone, and would otherwise report a launcher that died of the signal with no reason.
        engine.barrier()
        self.log.info("preempted by %s: checkpoint of step %d committed; rerun the same command to resume",
                      self.preemption.signal_name, step)
        raise failures.Preempted(step, self.preemption.signal_name)

    def _write_run_files(self) -> None:
        if self.ranks.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run.run_config, json.dumps(to_dict(self.config), indent=2) + "\n")
            write_atomic(self.run.ds_config, json.dumps(self.checks.ds_config, indent=2) + "\n")
        for warning in self.checks.warnings:
            self.log.warning("%s", warning)
        parallel = (f" (sequence-parallel groups of {self.config.parallel.sequence_parallel}, {self.data_size} "
                    "data-parallel)" if self.sequence_groups else "")
        self.log.info("%d ranks%s on %s, %s, ZeRO-%d, %s, global batch %d, %d samples (%s)", self.ranks.world_size,
                      parallel, self.device.type, self.config.model.dtype, zero_stage(self.checks.ds_config),
                      optimizer_in_use(self.checks.ds_config), self.global_batch, self.checks.manifest.num_samples,
                      self.family.name)

    def _build(self) -> None:
        """Model with identical adapters on every rank (checked), the loss context, the engine."""
        config = self.config
        transformer = build_model(config.model.path, config.model.dtype, config.lora, config.train.seed,
                                  config.model.gradient_checkpointing, self.checks.initial_adapter,
                                  compile_blocks=config.model.compile == "blocks")
        sequence = None
        if self.sequence_groups is not None:
            groups = self.sequence_groups
            sequence = enable_sequence_parallel(transformer, groups.group, groups.parts, groups.index)
        adapter = lora_parameters(transformer)
        self.lora_names = sorted(adapter)
        self.ema = None
        if config.train.ema_decay:  # the shapes now: ZeRO-3 leaves empty placeholders once it partitions
            self.ema = AdapterEMA(config.train.ema_decay, {name: p.shape for name, p in adapter.items()},
                                  self.ranks.rank, self.ranks.world_size)
        checksums = engine.all_gather_object(adapter_checksum(lora_state_dict(transformer)))
        if len(set(checksums)) != 1:
            raise RankError(f"LoRA adapters differ across ranks at start-up (checksums {checksums}); "
                            "check that every node runs the same cogvx, torch and peft versions")
        self.initial_checksum = checksums[0]
        initial = self.checks.initial_adapter
        if initial is not None:
            rescaled = (f", B scaled by {initial.settings.alpha / config.lora.alpha:g} from its lora_alpha "
                        f"{initial.settings.alpha:g}" if initial.settings.alpha != config.lora.alpha else "")
            self.log.info("adapter starts from %s (rank %d%s)", initial.file, initial.settings.rank, rescaled)
        self.context = LossContext(self.family, self.checks.checkpoint.transformer_config,
                                   load_scheduler(config.model.path), sequence)
        on_gpu = self.device.type == "cuda"
        self.attention_name, kernels = choose_attention(
            config.model.attention_backend, self.device.type,
            torch.cuda.get_device_capability(self.device) if on_gpu else None,
            on_gpu and torch.backends.cudnn.is_available())
        check_attention(config.model.attention_backend, kernels, self.device, self.dtype,
                        self.checks.checkpoint.transformer_config["attention_head_dim"])
        self.attention = lambda: attention_kernels(kernels)
        self.log.info("attention: %s", self.attention_name)
        self.engine = engine.Engine(transformer, self.checks.ds_config,
                                    lr_lambda(config.optim, config.train.max_steps), self.sequence_groups)
        self.held_out = None
        if self.checks.eval_index is not None:
            self.held_out = HeldOutLoss(self.checks.eval_index, config.log.eval_timesteps, config.train.seed,
                                        self.data_rank, self.data_size, counts_samples=self.reports_samples)
        self.watchdog.progress(0)

    def _restore(self) -> tuple[int, int]:
        """(optimizer step, stream position) to start from: the resume checkpoint's, or (0, 0)."""
        resume_from, passed_over = checkpoints.find_resume_point(self.config.output_dir, self.config.checkpoint.resume)
        for warning in passed_over:
            self.log.warning("%s", warning)
        chosen = engine.all_gather_object(str(resume_from))
        if len(set(chosen)) != 1:
            raise RankError(f"ranks chose different checkpoints to resume from: {chosen}")
        if resume_from is None:
            records.truncate(self.run, self.ranks, 0)
            self._start_ema(None)
            return 0, 0
        committed = checkpoints.read_commit(resume_from)
        step, position = int(committed["step"]), int(committed["position"])
        self.bad_samples = int(committed.get("bad_samples", 0))
        self.skipped_steps = int(committed.get("skipped_steps", 0))
        # Checkpoints from before a layout key was recorded were saved in the layout of their time: taken as this one.
        changed = {key: (committed.get(key, now), now) for key, now in self._layout().items()
                   if committed.get(key, now) != now}
        if not changed:
            self.engine.load(resume_from)
        else:
            self._restore_elsewhere(resume_from, step, changed)
        self._start_ema(resume_from)
        records.truncate(self.run, self.ranks, step)
        self.saved_step = step
        self.log.info("resumed from %s: step %d, sample position %d (saved with %d ranks, now %d)", resume_from,
                      step, position, committed["world_size"], self.ranks.world_size)
        if step >= self.config.train.max_steps:
            self.log.info("nothing to do: step %d >= train.max_steps %d", step, self.config.train.max_steps)
        return step, position

    def _start_ema(self, checkpoint: Path | None) -> None:
        """The moving average from the checkpoint's lora_ema/, or from the current weights."""
        if self.ema is None:
            return
        chunks = self.engine.local_chunks(self.lora_names)
        saved = checkpoint / self.run.lora_ema.name if checkpoint is not None else None
        if saved is None or not saved.is_dir():
            if saved is not None:
                self.log.warning("%s has no adapter average: train.ema_decay starts it at the resumed weights",
                                 checkpoint)
            self.ema.start(chunks)
            return
        whole = memory_names(load_exported_lora(saved).state)
        if sorted(whole) != self.lora_names:
            raise RankError(f"{saved}: the saved average does not hold this run's adapter layers")
        self.ema.restore(whole, chunks)

    def _layout(self) -> dict[str, Any]:
        """How the engine holds the training state: DeepSpeed's own checkpoint files fit only the layout that wrote
        them (the ZeRO stage's partitions, the bf16 optimizer's file names, CPU Adam's state, one partition per
        rank)."""
        return {"world_size": self.ranks.world_size, "sequence_parallel": self.config.parallel.sequence_parallel,
                "zero_stage": zero_stage(self.checks.ds_config), "dtype": self.config.model.dtype,
                "optimizer_offload": offloads_optimizer(self.checks.ds_config),
                "optimizer": optimizer_type(self.checks.ds_config)}

    def _restore_elsewhere(self, folder: Path, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
        """Another layout (`_layout`): DeepSpeed's files do not fit, the whole-tensor copies do. Adam's moments carry
        over unless the optimizer changed to or from one that keeps none."""
        saved_type, new_type = changed.get("optimizer", (ADAM_TYPES[0], ADAM_TYPES[0]))
        keeps_moments = saved_type in ADAM_TYPES and new_type in ADAM_TYPES
        moments = checkpoints.read_adam_moments(folder) if keeps_moments else None
        if moments is not None and moments[0]:
            self.engine.restore_moments(*moments)
        weights, _ = checkpoints.read_master_weights(folder)
        self.engine.restore_weights(weights, step)
        restarted = " (the new optimizer's state starts fresh)" if not keeps_moments else \
            " (no Adam moments saved: they restart)"
        self.log.warning("%s: weights, LR schedule, sample position%s restored from whole-tensor copies",
                         " and ".join(f"{LAYOUT_NAMES[key]} changed ({before} -> {now})"
                                      for key, (before, now) in changed.items()),
                         " and Adam moments" if moments else restarted)

    def _micro_batches(self, start_step: int, position: int) -> Any:
        """This rank's micro-batches from the stream position on (local shards), each with its random numbers drawn
        in the loader, or a streamed draw (whose numbers the step draws)."""
        config = self.config
        dropout = config.train.caption_dropout if self.checks.empty_prompt is not None else 0.0
        self.draws = StepDraws(self.context, config.train.seed, self.data_rank, config.train.grad_accum_steps,
                               start_step + 1, dropout)
        if self.checks.index is not None:
            plan = BatchPlan(config.train.micro_batch_size, config.train.grad_accum_steps, self.data_rank,
                             self.data_size)
            steps_left = max(0, config.train.max_steps - start_step)
            batches = MicroBatches(self.checks.index, plan, config.train.seed, position, steps_left,
                                   config.data.on_bad_sample, self.draws)
        else:
            batches = StreamingMicroBatches(config.data.shards, self.checks.manifest, config.train.micro_batch_size,
                                            config.train.seed, self.data_rank, start_step)
        on_gpu = self.device.type == "cuda"
        workers = config.data.num_workers if config.data.num_workers is not None else int(on_gpu)
        return iter(make_loader(batches, workers, pin_memory=on_gpu))

    def _progress_bar(self, start_step: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=start_step, desc="train", unit="step",
                    disable=not (self.ranks.is_main and self.config.log.progress_bar), dynamic_ncols=True)

    def save(self, step: int, position: int) -> None:
        """Collective: checkpoint the engine, export the adapter and whole-tensor copies, then commit and prune."""
        if step == self.saved_step:
            return
        folder = self.run.checkpoint(step)
        state = {"step": step, "position": position, "seed": self.config.train.seed, **self._layout(),
                 "bad_samples": self.bad_samples,
                 "skipped_steps": self.skipped_steps,
                 "rng": "noise, timesteps and order derive from (seed, step, micro-step, rank); nothing to restore"}
        try:
            self._write_checkpoint(folder, state)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
            if not isinstance(err, OSError) and not disk_is_full(folder):
                raise
            raise RankError(f"saving checkpoint step {step} failed: {describe_io_error(err, folder)}; the previous "
                            "committed checkpoint is intact") from err
        self.saved_step = step
        self.watchdog.progress(step)
        if self.committed_fault:
            self.committed_fault(step)

    def _write_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        self.engine.save(folder, state)
        masters = self.engine.gather_weights(self.lora_names)
        moments, optimizer_step = self.engine.gather_moments(self.lora_names)
        adapter = state_dict_names(masters)
        average = state_dict_names(self.ema.gather()) if self.ema is not None else None
        if self.ranks.is_main:
            export_lora(adapter, self.config.lora, folder / self.run.lora.name, self.family.name)
            if average is not None:
                export_lora(average, self.config.lora, folder / self.run.lora_ema.name, self.family.name)
            checkpoints.write_master_weights(folder, masters, {"step": state["step"], "position": state["position"]})
            if moments:
                checkpoints.write_adam_moments(folder, moments, optimizer_step)
        engine.barrier()
        if self.ranks.is_main:
            checkpoints.commit(folder, {**state, "adapter_checksum": adapter_checksum(adapter)})
            checkpoints.prune(self.config.output_dir, self.config.checkpoint.keep_last)
        engine.barrier()

    def _finish(self, start_step: int, position: int) -> dict[str, Any]:
        """Check the ranks ended with the same adapter, export it and write the summary."""
        final = state_dict_names(self.engine.gather_weights(self.lora_names))
        average = state_dict_names(self.ema.gather()) if self.ema is not None else None
        final_checksums = engine.all_gather_object(adapter_checksum(final))
        if len(set(final_checksums)) != 1:
            raise RankError(f"adapters differ across ranks after training: {final_checksums}")
        summary = {
            "steps": self.config.train.max_steps,
            "resumed_from_step": start_step,
            "samples_seen": position,
            "world_size": self.ranks.world_size,
            "zero_stage": zero_stage(self.checks.ds_config),
            "adapter_checksums": final_checksums,
            "initial_adapter_checksum": self.initial_checksum,
            "family": self.family.name,
            "bad_samples": self.bad_samples,
            "skipped_steps": self.skipped_steps,
        }
        if self.ranks.is_main:
            try:
                export_lora(final, self.config.lora, self.run.lora, self.family.name)
                if average is not None:
                    export_lora(average, self.config.lora, self.run.lora_ema, self.family.name)
                write_atomic(self.run.summary, json.dumps(summary, indent=2) + "\n")
            except OSError as err:
                raise RankError(f"exporting the adapter failed: {describe_io_error(err, self.run.lora)}") from err
            self.log.info("done: %d steps, adapter %s, exported to %s", self.config.train.max_steps,
                          final_checksums[0][:12], self.run.lora)
        return summary


FULL_BELOW = 16 << 20
"""Free bytes under which a failed write is put down to a full disk."""


def _existing(path: Path) -> Path:
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def disk_is_full(path: Path) -> bool:
    """True when the filesystem holding `path` has almost no space left."""
    return shutil.disk_usage(_existing(path)).free < FULL_BELOW


def describe_io_error(err: Exception, path: Path) -> str:
    """A failed write with the path and, when the disk is the problem, the space left there."""
    import errno

    where = _existing(path)
    free = shutil.disk_usage(where).free
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BELOW
    cause = "the disk is full" if full else (getattr(err, "strerror", None) or first_line(err))
    return f"{cause} writing {getattr(err, 'filename', None) or path} ({free / 2**20:.1f} MiB free on {where})"

