"""Train tier pieces in one process: config loading, batch planning, the loss per family, checkpoint folders,
DeepSpeed config resolution, and one-line errors for bad runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from cogvx_dist.core.config_files import load_config
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import FAMILIES
from cogvx_dist.core.loading import describe_checkpoint, load_scheduler, load_transformer
from cogvx_dist.core.lora import LoraSettings, inject_lora
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.core.synthetic_shards import write_synthetic_shards
from cogvx_dist.train import checkpoints as ckpt
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.data.reader import BatchSplit, MicroBatches, SampleStream, ShardIndex
from cogvx_dist.train.ds_config import load_ds_config, resolve_ds_config, run_values
from cogvx_dist.train.schedule import lr_lambda
from cogvx_dist.train.step.loss import LossContext, diffusion_loss
from tests.helpers import assert_one_line_error, cli, make_adapter, shard_keys, write_checkpoint, write_config


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('output_dir = "out"\n[model]\npath = "m"\n[data]\nshards = "s"\n[train]\nmax_steps = 7\n')
    config = load_config(RunConfig, path, ["train.micro_batch_size=2", "optim.betas=[0.8, 0.9]", "lora.rank=4"])
    assert (config.train.max_steps, config.train.micro_batch_size, config.optim.betas) == (7, 2, [0.8, 0.9])
    assert config.lora.rank == 4 and config.lora.alpha == 64.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key optim.lrr"),
        (["train.max_steps=ten"], "train.max_steps must be an integer"),
        (["optim.schedule=linear"], "optim.schedule must be one of"),
        (["lora.rank=0"], "lora.rank must be a positive integer"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps must be at least 1"),
        (["model.path="], "model.path is required"),
        (["nonsense"], "not of the form section.key=value"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(CogvxError, match=message):
        load_config(RunConfig, None, ["model.path=m", "data.shards=s", *overrides])


def test_config_file_that_is_not_text_is_one_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CogvxError, match="not UTF-8 text"):
        load_config(RunConfig, path)


def test_global_batch_sets_the_accumulation_at_each_world_size():
    config = load_config(RunConfig, None, ["model.path=m", "data.shards=s", "train.global_batch_size=6",
                                           "train.grad_accum_steps=2"])
    assert config.check_world(3) == 6
    assert [config.at_world(ranks).train.grad_accum_steps for ranks in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(CogvxError, match="train.global_batch_size=6 is not micro_batch_size .1. x 4 data-parallel"):
        config.check_world(4)
    plain = load_config(RunConfig, None, ["model.path=m", "data.shards=s", "train.grad_accum_steps=2"])
    assert plain.at_world(3).train.grad_accum_steps == 2 and plain.check_world(3) == 6


@pytest.mark.parametrize("micro, accum, ranks", [(1, 1, 2), (2, 3, 2), (1, 2, 3)])
def test_batch_plan_covers_each_global_batch_once(micro, accum, ranks):
    plans = [BatchSplit(micro, accum, rank, ranks) for rank in range(ranks)]
    global_batch = plans[0].global_batch
    for step in range(3):
        seen = [p for plan in plans for m in range(accum) for p in plan.positions(10, step * accum + m)]
        assert sorted(seen) == list(range(10 + step * global_batch, 10 + (step + 1) * global_batch))


def test_sample_stream_is_a_seeded_permutation_per_epoch():
    stream = SampleStream(5, seed=3)
    epochs = [[stream.sample_at(e * 5 + i) for i in range(5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again = SampleStream(5, seed=3)
    assert [again.sample_at(p) for p in range(15)] == [x for e in epochs for x in e]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_trains_only_the_adapter_for_every_family(tiny_checkpoint, tmp_path, family):
    model = tiny_checkpoint(family)
    write_synthetic_shards(tmp_path, model, [2])
    info = describe_checkpoint(model)
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, alpha=4.0), seed=0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)  # so gradients reach lora_A too
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    batch = MicroBatches(ShardIndex(tmp_path), BatchSplit(2, 1, 0, 1), seed=0, start_position=0, steps=1)[0]
    loss = diffusion_loss(transformer, batch, context, torch.Generator().manual_seed(0), torch.device("cpu"),
                          torch.float32)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    again = diffusion_loss(transformer, batch, context, torch.Generator().manual_seed(0), torch.device("cpu"),
                           torch.float32)
    assert again.item() == loss.item()  # the generator is the only source of randomness


def test_warmup_then_cosine():
    config = load_config(RunConfig, None, ["model.path=m", "data.shards=s", "optim.warmup_steps=4",
                                           "optim.schedule=cosine", "train.max_steps=20", "optim.min_lr_ratio=0.1"])
    factor = lr_lambda(config.optim, config.train.max_steps)
    values = [factor(k) for k in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0] and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and values[20] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_ds_configs_resolve_to_concrete_values(name):
    base = load_ds_config(name)
    values = run_values(micro_batch_size=2, grad_accum_steps=3, max_grad_norm=0.5, lr=1e-3, betas=[0.9, 0.99],
                        eps=1e-8, weight_decay=0.0, bf16=True)
    resolved = resolve_ds_config(base, values, on_gpu=True)
    assert resolved["train_micro_batch_size_per_gpu"] == 2 and resolved["gradient_accumulation_steps"] == 3
    assert resolved["gradient_clipping"] == 0.5 and resolved["optimizer"]["params"]["lr"] == 1e-3
    assert resolved["bf16"]["enabled"] is True and resolved["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert resolved["zero_optimization"]["stage"] == int(name[4])
    assert "auto" not in json.dumps(resolved)
    # The shipped file says "auto" for exactly what cogvx fills, so it shows no number that is never used.
    assert "auto" in json.dumps(base)
    base["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(CogvxError, match="zero_optimization.reduce_bucket_size"):
        resolve_ds_config(base, values, on_gpu=True)


@pytest.mark.parametrize(("content", "message"), [
    ("[]", "holds a JSON list, not an object of settings"),
    ('{"zero_optimization": 2}', '"zero_optimization" must be an object, got 2'),
    ('{"zero_optimization": {"stage": "two"}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 'two'"),
    ('{"optimizer": {"type": "AdamW", "params": []}}', '"optimizer.params" must be an object'),
    ('{"bf16": true}', '"bf16" must be an object, got True'),
])
def test_a_deepspeed_config_of_the_wrong_shape_is_one_error(tmp_path, content, message):
    """The pre-flight reads and fills these parts; a wrong shape is named instead of failing with a traceback."""
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(CogvxError, match=re.escape(f"deepspeed.config {path}: {message}")):
        load_ds_config(str(path))


@pytest.mark.parametrize("name, on_gpu, runs", [
    ("zero2", True, "torch.optim.AdamW (fused, no build)"),
    ("zero3", True, "torch.optim.AdamW (fused, no build)"),
    ("zero2", False, "torch.optim.AdamW (foreach, no build)"),
    ("zero2_offload", True, "DeepSpeedCPUAdam"),
    ("zero3_offload", False, "DeepSpeedCPUAdam"),
])
def test_the_optimizer_needs_no_build_unless_asked(name, on_gpu, runs):
    """No JIT-built FusedAdam by default: torch's fused AdamW on GPUs; an explicit "torch_adam": false keeps it."""
    from cogvx_dist.train.ds_config import optimizer_in_use

    values = run_values(micro_batch_size=1, grad_accum_steps=1, max_grad_norm=1.0, lr=1e-4, betas=[0.9, 0.95],
                        eps=1e-8, weight_decay=0.0, bf16=on_gpu)
    resolved = resolve_ds_config(load_ds_config(name), values, on_gpu=on_gpu)
    assert optimizer_in_use(resolved).startswith(runs)
    if "offload" in name:  # DeepSpeed would take torch's AdamW over its CPU Adam if torch_adam were true
        assert not resolved["optimizer"]["params"].get("torch_adam")
    explicit = load_ds_config(name)
    explicit["optimizer"]["params"]["torch_adam"] = False
    chosen = optimizer_in_use(resolve_ds_config(explicit, values, on_gpu=on_gpu))
    assert chosen.startswith("DeepSpeed FusedAdam" if on_gpu and "offload" not in name else runs)


def test_resume_auto_takes_newest_committed_and_prune_keeps_last(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 3, 4, 6, 8):
        folder = run.checkpoint(step)
        folder.mkdir(parents=True)
        if step not in (3, 8):  # steps 3 and 8 crashed mid-save: no marker
            ckpt.commit(folder, {"step": step})
    assert ckpt.find_resume_point(tmp_path, "auto") == (run.checkpoint(6), [])
    assert ckpt.find_resume_point(tmp_path, "none") == (None, [])
    with pytest.raises(CogvxError, match="not a complete checkpoint"):
        ckpt.find_resume_point(tmp_path, str(run.checkpoint(8)))
    ckpt.prune(tmp_path, keep_last=2)
    assert [s for s, _ in run.complete_checkpoints()] == [4, 6]
    assert run.checkpoint(8).exists()  # newer than the newest commit: maybe still being written
    assert not run.checkpoint(3).exists()  # an abandoned save older than a commit goes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_whole_tensor_copies_follow_the_umask(tmp_path, umask):
    """The weight and moment copies a resume reads are as readable as every other run file: safetensors wrote them
    0600 whatever the umask, so a watcher or a resume under another user of a shared run folder failed on them."""
    previous = os.umask(umask)
    try:
        weights = ckpt.write_master_weights(tmp_path, {"w": torch.ones(2)}, {"step": 1, "position": 2})
        moments = ckpt.write_adam_moments(tmp_path, {"exp_avg/w": torch.ones(2), "exp_avg_sq/w": torch.ones(2)}, 1)
    finally:
        os.umask(previous)
    assert [oct(path.stat().st_mode & 0o777) for path in (weights, moments)] == [oct(0o666 & ~umask)] * 2


def test_commit_marker_records_files_and_resume_passes_over_a_damaged_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    for step in (4, 8):
        folder = run.checkpoint(step)
        (folder / "lora").mkdir(parents=True)
        (folder / "lora" / "adapter.safetensors").write_bytes(bytes(range(256)) * 4)
        (folder / "optim_states.pt").write_bytes(b"x" * 1000)
        ckpt.commit(folder, {"step": step})
    files = ckpt.read_commit(run.checkpoint(8))["files"]
    assert files["optim_states.pt"]["bytes"] == 1000 and "sha256" in files["lora/adapter.safetensors"]
    (run.checkpoint(8) / "optim_states.pt").write_bytes(b"x" * 10)  # truncated after the commit
    chosen, warnings = ckpt.find_resume_point(tmp_path, "auto")
    assert chosen == run.checkpoint(4)
    assert len(warnings) == 1 and "step 8" in warnings[0] and "optim_states.pt is 10 bytes, the marker says 1000" \
        in warnings[0]
    with pytest.raises(CogvxError, match="step-00000008 is damaged: optim_states.pt is 10 bytes"):
        ckpt.find_resume_point(tmp_path, str(run.checkpoint(8)))
    adapter = run.checkpoint(4) / "lora" / "adapter.safetensors"
    adapter.write_bytes(bytes(reversed(adapter.read_bytes())))  # same size, other bytes
    assert ckpt.find_resume_point(tmp_path, "auto") == (None, [
        *warnings, f"checkpoint step 4 ({run.checkpoint(4)}) is damaged and passed over: lora/adapter.safetensors "
        "differs from its sha256 in the marker"])


def test_training_ranks_cannot_build_encoders(tiny_checkpoint):
    script = (
        "import sys\n"
        "from cogvx_dist.train.step.model import forbid_encoders\n"
        "from cogvx_dist.core.loading import load_transformer, load_text_encoder, load_vae\n"
        "forbid_encoders()\n"
        "load_transformer(sys.argv[1])\n"
        "try:\n"
        "    load_text_encoder(sys.argv[1])\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
        "try:\n"
        "    load_vae(sys.argv[1])\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint("CogVideoX-2b"))], capture_output=True,
                         text=True, check=True)
    assert "refused: a training rank tried to build T5EncoderModel" in out.stdout
    assert "refused: a training rank tried to build AutoencoderKLCogVideoX" in out.stdout


CLAIM_SCRIPT = """
import threading
from cogvx_dist.train import failures
failures.claim_rank_end()  # this thread ends the rank (say, a stall watchdog about to kill a stopped peer)
def main_thread_after_its_collective_broke():
    failures.claim_rank_end()
    print("the second thread went on")
second = threading.Thread(target=main_thread_after_its_collective_broke, daemon=True)
second.start()
second.join(0.5)
print("the second thread waits:", second.is_alive())
failures.claim_rank_end()  # the first thread goes on to record and exit
print("the first thread claims again")
"""


def test_the_first_thread_to_end_a_rank_owns_its_end_and_a_second_one_waits():
    out = subprocess.run([sys.executable, "-c", CLAIM_SCRIPT], capture_output=True, text=True, check=True, timeout=60)
    assert "the second thread waits: True" in out.stdout and "the first thread claims again" in out.stdout
    assert "went on" not in out.stdout


MUON_SCRIPT = """
import os, sys
from cogvx_dist.train import engine
engine._import_muon_uncompiled()
assert engine.MUON_MODULE in sys.modules
print("inductor loaded:", "torch._inductor.compile_fx" in sys.modules)
print("dynamo disabled:", os.environ.get("TORCHDYNAMO_DISABLE"))
import torch
def double(x):
    return 2 * x
print("compile works:", torch.compile(double) is not double)
"""


def test_deepspeeds_muon_module_is_imported_without_compiling_and_compile_still_works():
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "0"}  # the user's own setting, which leaves compile on
    out = subprocess.run([sys.executable, "-c", MUON_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert "inductor loaded: False" in out.stdout  # inductor's import is not paid by every rank
    assert "dynamo disabled: 0" in out.stdout  # the user's setting is as it was
    assert "compile works: True" in out.stdout  # model.compile is not turned off by it


@pytest.fixture(scope="module")
def good_run(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("CogVideoX-2b")
    root = tmp_path_factory.mktemp("bad-runs")
    write_synthetic_shards(root / "shards", model, [2, 1])
    make_adapter(model, root / "lora-5b", seed=1, family="CogVideoX-5b")  # rank 4, and recorded as another family
    return model, root


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_step=3"], "unknown config key train.max_step"),
        (["train.global_batch_size=3"], "train.global_batch_size=3 is not micro_batch_size"),
        (["data.shards=/nonexistent/shards"], "data.shards: no shard manifest"),
        (["deepspeed.config=zero4"], "deepspeed.config 'zero4': no such file"),
        (["model.path={five_b}"], "shards do not match the model: family CogVideoX-2b (model is CogVideoX-5b)"),
        (["train.ema_decay=1"], "train.ema_decay must be within [0, 1) (0: no average), got 1"),
        (["train.seed=-1"], "train.seed must be within [0, 2**32), got -1"),
        (["train.seed=100000000000000"], "train.seed must be within [0, 2**32)"),  # overflowed the sample order
        (["model.compile=blocks", "deepspeed.config=zero3"], "model.compile: blocks does not go with ZeRO-3"),
        (["log.eval_every_steps=2"], "log.eval_every_steps needs data.eval_shards"),
        (["data.eval_shards={root}/shards"], "data.eval_shards is set but log.eval_every_steps is 0"),
        (["data.eval_shards=/nonexistent", "log.eval_every_steps=2"], "data.eval_shards: no shard manifest"),
        (["data.eval_shards={root}/shards", "log.eval_every_steps=2", "log.eval_timesteps=[10, 1000]"],
         "log.eval_timesteps [1000] beyond the scheduler's 1000 training timesteps"),
        (["lora.init_from=/nonexistent/lora"], "lora.init_from: no LoRA weights at /nonexistent/lora"),
        (["lora.init_alpha=4"], "lora.init_alpha (4) must be positive, and only goes with lora.init_from"),
        (["parallel.sequence_parallel=0"], "parallel.sequence_parallel must be at least 1, got 0"),
        (["parallel.sequence_parallel=3"], "parallel.sequence_parallel 3 does not divide the 2 ranks"),
        (["lora.init_from={root}/lora-5b"], "has rank 4, but lora.rank is 8; set lora.rank: 4"),
        (["lora.init_from={root}/lora-5b", "lora.rank=4"], "was trained on CogVideoX-5b, but model.path is "
                                                            "CogVideoX-2b"),
    ],
)
def test_bad_runs_fail_before_training_with_one_line(good_run, tiny_checkpoint, tmp_path, capsys, overrides,
                                                     message):
    model, root = good_run
    config = write_config(tmp_path / "run.yaml", model, root / "shards", tmp_path / "out")
    overrides = [o.format(five_b=tiny_checkpoint("CogVideoX-5b"), root=root) for o in overrides]
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "2", *overrides)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_adapter_settings_fails_before_training(good_run, tmp_path, capsys):
    """A resume that would load another adapter (DeepSpeed's tensor-size error on every rank) or silently train
    another model is refused by the pre-flight, naming what changed."""
    from cogvx_dist.train.preflight import preflight

    model, root = good_run
    config = write_config(tmp_path / "run.yaml", model, root / "shards", tmp_path / "out")
    write_checkpoint(tmp_path / "out", model, step=4, seed=1)  # rank 4, alpha 4, the default targets
    same = ["lora.rank=4", "lora.alpha=4"]
    preflight(load_config(RunConfig, config, same))  # the checkpoint's own settings resume
    for changed, message in ((["lora.rank=8"], "lora.rank 4 (this config: 8)"),
                             (["lora.alpha=8"], "lora.alpha 4.0 (this config: 8.0)"),
                             (["lora.target_modules=[to_q, to_v]"], "lora.target_modules ['to_k', 'to_out.0', 'to_q', "
                                                                    "'to_v'] (this config: ['to_q', 'to_v'])")):
        code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1", *same, *changed)
        assert_one_line_error(code, err, "checkpoint.resume:", "step-00000004 was trained with", message)
    make_adapter(model, tmp_path / "out" / "checkpoints" / "step-00000008" / "lora", seed=2, family="CogVideoX-5b")
    ckpt.commit(tmp_path / "out" / "checkpoints" / "step-00000008", {"step": 8})
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1", *same)
    assert_one_line_error(code, err, "step-00000008 was trained with family CogVideoX-5b (this config: CogVideoX-2b)")
    preflight(load_config(RunConfig, config, [*same, "checkpoint.resume=none"]))  # a fresh start reads no checkpoint


def test_streaming_reads_pipe_locations(good_run):
    from cogvx_dist.train.data.streaming import StreamingMicroBatches, member_url, read_remote_manifest

    _, root = good_run
    location = f"pipe:cat {root / 'shards'}/{{name}}"
    assert member_url(location, "a.tar") == f"pipe:cat {root / 'shards'}/a.tar"
    manifest = read_remote_manifest(location)
    assert manifest.num_samples == 3
    stream = iter(StreamingMicroBatches(location, manifest, micro_batch_size=2, seed=0, rank=0, start_step=0))
    batches = [next(stream) for _ in range(4)]  # endless: more micro-batches than the dataset holds
    assert all(b["latent_mean"].shape[0] == 2 for b in batches)
    assert {k for b in batches for k in b["keys"]} <= {k for keys in shard_keys(root / "shards").values() for k in keys}
    with pytest.raises(CogvxError, match="cannot read|empty"):
        read_remote_manifest(f"pipe:cat {root}/missing/{{name}}")


@pytest.mark.parametrize("every, expected_calls", [(0, 0), (1, 2), (2, 1)])
def test_gradient_checkpointing_every_kth_block(tiny_checkpoint, monkeypatch, every, expected_calls):
    import torch.utils.checkpoint

    from cogvx_dist.train.step.model import enable_gradient_checkpointing

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model = tiny_checkpoint("CogVideoX-2b")
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, alpha=4.0), seed=0)
    enable_gradient_checkpointing(transformer, every)
    hidden = torch.randn(1, 3, 16, 4, 6)
    text = torch.randn(1, 226, 32)
    out = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([10])).sample
    out.square().mean().backward()
    assert len(calls) == expected_calls
    checkpointed_blocks = [getattr(f, "__self__", f) for f in calls]
    assert checkpointed_blocks == (list(transformer.transformer_blocks)[::every] if every else [])


def test_listed_resolution_buckets_are_checked(good_run, tmp_path):
    import shutil

    from cogvx_dist.core.shard_format import Manifest
    from cogvx_dist.train.preflight import preflight

    model, root = good_run
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    manifest = Manifest.read(shards)
    manifest.buckets = [[manifest.height, manifest.width], [manifest.width, manifest.height]]
    manifest.write(shards)
    overrides = [f"model.path={model}", f"data.shards={shards}"]
    assert preflight(load_config(RunConfig, None, overrides)).manifest.sizes()[1] == (48, 32)
    # Two buckets listed, the samples fill one: micro-batches of 2 take the plain order, with nothing to warn about.
    assert preflight(load_config(RunConfig, None, [*overrides, "train.micro_batch_size=2"])).warnings == []
    manifest.buckets.append([40, 48])
    manifest.write(shards)
    with pytest.raises(CogvxError, match="resolution 40x48 \\(must be a multiple of 16\\)"):
        preflight(load_config(RunConfig, None, overrides))


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import time

    from cogvx_dist.train.run_lock import STALE_AFTER_S, RunLock, check_free

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunFolder(tmp_path).lock
        record = {"host": socket.gethostname(), "pid": holder.pid, "started": time.time(), "heartbeat": time.time()}
        lock.write_text(json.dumps(record))
        with pytest.raises(CogvxError, match=f"in use by another training run \\(pid {holder.pid} on"):
            check_free(tmp_path)
        with pytest.raises(CogvxError, match="in use by another training run"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    mine = RunLock(tmp_path)
    mine.acquire()  # the holder's pid is gone: its lock is stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()
    # On another host only the heartbeat tells: fresh is live, old is stale.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time()}))
    with pytest.raises(CogvxError, match="on elsewhere"):
        check_free(tmp_path)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0,
                                "heartbeat": time.time() - STALE_AFTER_S - 1}))
    check_free(tmp_path)


def test_a_shard_whose_size_changed_is_found_before_training(good_run, tmp_path):
    import shutil

    from cogvx_dist.train.preflight import preflight

    model, root = good_run
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    victim = sorted(shards.glob("shard-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-512])
    overrides = [f"model.path={model}", f"data.shards={shards}"]
    with pytest.raises(CogvxError, match=f"shard {victim}: .* the manifest says .*on_bad_sample: skip"):
        preflight(load_config(RunConfig, None, overrides))
    checks = preflight(load_config(RunConfig, None, [*overrides, "data.on_bad_sample=skip"]))
    assert len(checks.warnings) == 1 and "will be skipped" in checks.warnings[0]
    preflight(load_config(RunConfig, None, [*overrides, "data.verify=none"]))  # not looked at


def test_the_reader_replaces_bad_samples_deterministically(good_run, tmp_path):

    from tests.helpers import damaged_copy

    model, root = good_run
    shards, _, bad_key = damaged_copy(root / "shards", tmp_path, "header")  # the first shard's second sample
    index = ShardIndex(shards)
    bad = next(i for i in range(len(index)) if index.key(i) == bad_key)
    fail = MicroBatches(ShardIndex(shards), BatchSplit(1, 1, 0, 1), seed=0, start_position=0, steps=3)
    skip = MicroBatches(ShardIndex(shards), BatchSplit(1, 1, 0, 1), seed=0, start_position=0, steps=3,
                        on_bad="skip")
    first = next(i for i in range(3) if skip.stream.sample_at(i) == bad)
    assert "failure" in fail[first] and bad_key in fail[first]["failure"] and "rank 0" in fail[first]["failure"]
    replaced = skip[first]
    assert replaced["keys"] == [index.key(bad + 1)] and replaced["bad"][0]["key"] == bad_key
    again = MicroBatches(ShardIndex(shards), BatchSplit(1, 1, 0, 1), seed=0, start_position=0, steps=3,
                         on_bad="skip")[first]
    assert again["keys"] == replaced["keys"] and torch.equal(again["latent_mean"], replaced["latent_mean"])


def test_streaming_with_loader_workers_trains_each_micro_batch_once(synthetic_shards):
    """Two loader workers must not each yield the same stream (every micro-batch would be trained twice)."""
    from collections import Counter

    from cogvx_dist.train.data.reader import make_loader
    from cogvx_dist.train.data.streaming import StreamingMicroBatches, read_remote_manifest

    _, shards = synthetic_shards((3, 3, 2))
    location = f"pipe:cat {shards}/{{name}}"
    stream = StreamingMicroBatches(location, read_remote_manifest(location), micro_batch_size=1, seed=0, rank=0,
                                   start_step=0)
    loader = iter(make_loader(stream, num_workers=2))
    keys = [next(loader)["keys"][0] for _ in range(16)]
    pairs = list(zip(keys[::2], keys[1::2]))  # the loader takes micro-batches from workers 0 and 1 in turn
    assert sum(a == b for a, b in pairs) < len(pairs) // 2, keys
    counts = Counter(keys)
    assert any(count % 2 for count in counts.values()), counts  # duplicated streams make every count even


def test_each_environment_builds_deepspeed_ops_in_its_own_folder(monkeypatch):
    from cogvx_dist.train.engine import extensions_dir, use_environment_extensions_dir

    assert extensions_dir("/envs/a") != extensions_dir("/envs/b")
    assert extensions_dir("/envs/a") == extensions_dir("/envs/a")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_environment_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(extensions_dir())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    use_environment_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/mine"  # the user's choice wins


def test_deepspeed_is_imported_without_mlflow_which_a_tracker_still_imports_after():
    """DeepSpeed's autotuner imports mlflow when it is installed (the trackers extra); a rank never needs it there.
    Run where mlflow is installed (tests/mlflow_env.py)."""
    from tests.helpers import mlflow_python

    check = ("import sys; from cogvx_dist.train.engine import import_deepspeed; import_deepspeed(); "
             "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules, 'mlflow came with deepspeed'; "
             "import mlflow; print(mlflow.__name__)")
    result = subprocess.run([str(mlflow_python()), "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "mlflow", result.stderr[-2000:]


def test_caption_dropout_draws_its_rate_and_repeats():
    import math

    from diffusers import CogVideoXDPMScheduler

    from cogvx_dist.core.shard_format import LATENT_MEAN, PROMPT_EMBEDS
    from cogvx_dist.train.step.loss import CAPTION_DROPPED, StepDraws, draw_randomness, drop_captions

    family = FAMILIES["CogVideoX-2b"]
    context = LossContext(family, {}, CogVideoXDPMScheduler(**family.scheduler_config()))
    batch = {LATENT_MEAN: torch.zeros(1, 2, 1, 2, 2), PROMPT_EMBEDS: torch.ones(1, 4, 3)}
    draws = StepDraws(context, seed=5, rank=0, grad_accum_steps=1, first_step=1, caption_dropout=0.2)

    def dropped() -> list[bool]:
        return [bool(draws(batch, micro_index)[CAPTION_DROPPED][0]) for micro_index in range(2000)]

    first = dropped()
    assert abs(sum(first) - 400) <= 3 * math.sqrt(2000 * 0.2 * 0.8), sum(first)  # binomial noise, 3 sigma
    assert dropped() == first
    marked = drop_captions(batch, torch.zeros(4, 3), torch.tensor([True]))[PROMPT_EMBEDS]
    assert torch.equal(marked, torch.zeros(1, 4, 3))
    assert CAPTION_DROPPED not in draw_randomness(batch, context, torch.Generator())  # p = 0 draws nothing


@pytest.mark.parametrize("override, message", [
    ("train.caption_dropout=1.5", "train.caption_dropout must be within [0, 1]"),
    ("train.caption_dropout=0.1", "train.caption_dropout: "),
])
def test_caption_dropout_errors_are_one_line(synthetic_shards, tmp_path, capsys, override, message):
    import shutil

    model, folder = synthetic_shards([3, 2])
    copy = tmp_path / "set"
    shutil.copytree(folder, copy)
    (copy / "empty_prompt.safetensors").unlink()  # a dataset prepped before caption dropout existed
    config = write_config(tmp_path / "run.yaml", model, copy, tmp_path / "out")
    code, _, err = cli(capsys, "train", "--config", str(config), override)
    line = assert_one_line_error(code, err, message)
    assert "1.5" in line or "empty_prompt.safetensors does not exist" in line


def test_caption_dropout_trains_with_the_datasets_empty_prompt(synthetic_shards):
    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.preflight import preflight

    model, folder = synthetic_shards([3, 2])
    overrides = [f"model.path={model}", f"data.shards={folder}"]
    assert preflight(load_config(RunConfig, None, overrides)).empty_prompt is None
    checks = preflight(load_config(RunConfig, None, [*overrides, "train.caption_dropout=0.1"]))
    assert checks.empty_prompt is not None and checks.empty_prompt.shape == (226, 32)


def test_the_held_out_loss_repeats_for_the_same_weights_and_splits_over_ranks(synthetic_shards):
    """Fixed timesteps and noise: two evaluations of the same weights agree to the bit, other weights give another
    number, and three ranks' shares (padded to equal length, the padding counting zero) sum to one rank's."""
    from cogvx_dist.train.evaluation import HeldOutLoss

    model, folder = synthetic_shards([3, 2])
    index = ShardIndex(folder)
    family = describe_checkpoint(model).family
    context = LossContext(family, describe_checkpoint(model).transformer_config, load_scheduler(model))
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, alpha=4.0), seed=0)
    whole = HeldOutLoss(index, [100, 600], seed=3, rank=0, world_size=1)

    def sums(held_out: HeldOutLoss) -> torch.Tensor:
        return held_out.local_sums(transformer, context, torch.device("cpu"), torch.float32)

    first = sums(whole)
    assert torch.equal(first, sums(whole)) and first[-1] == 5
    shares = [HeldOutLoss(index, [100, 600], seed=3, rank=rank, world_size=3) for rank in range(3)]
    assert [len(share.mine) for share in shares] == [2, 2, 2]
    torch.testing.assert_close(sum(sums(share) for share in shares), first, rtol=1e-6, atol=0)
    values = whole.values(first)
    assert values["eval/loss"] == pytest.approx((values["eval/loss_t100"] + values["eval/loss_t600"]) / 2)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.add_(0.05)
    assert not torch.equal(sums(whole), first)


def test_image_to_video_training_draws_one_noised_copy_per_sample_from_the_step_generator(tiny_checkpoint,
                                                                                        tmp_path):
    """Shards with K noised copies of the conditioning frame: each step's generator picks one per sample (all K in
    use over many steps, the same picks for the same step seed), and the loss reads the picked copy."""
    from cogvx_dist.core.shard_format import IMAGE_MEAN, NOISED_IMAGE_MEAN
    from cogvx_dist.train.data.reader import collate
    from cogvx_dist.train.step.loss import StepDraws, image_moments

    model = tiny_checkpoint("CogVideoX-5b-I2V")
    write_synthetic_shards(tmp_path / "shards", model, [4], image_noise_samples=3)
    index = ShardIndex(tmp_path / "shards")
    assert index.manifest.image_noise_samples == 3
    batch = collate([index.read(i)[0] for i in range(2)], [index.key(i) for i in range(2)])
    assert batch[NOISED_IMAGE_MEAN].shape[:2] == (2, 3)

    info = describe_checkpoint(model)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    draws = StepDraws(context, seed=5, rank=0, grad_accum_steps=1, first_step=1)

    def picks(step: int) -> list[int]:
        mean, _ = image_moments(batch, draws.for_step(batch, step, 0))
        return [next(k for k in range(3) if torch.equal(mean[b], batch[NOISED_IMAGE_MEAN][b, k])) for b in range(2)]

    drawn = [picks(step) for step in range(1, 61)]
    assert drawn == [picks(step) for step in range(1, 61)]
    assert {k for pair in drawn for k in pair} == {0, 1, 2}
    clean = {name: t for name, t in batch.items() if not name.startswith("noised_")}
    clean_draws = draws.for_step(clean, 1, 0)
    assert image_moments(clean, clean_draws)[0] is clean[IMAGE_MEAN]  # shards without copies: the clean frame
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, alpha=4.0), seed=0)

    def loss(of: dict, seed: int) -> torch.Tensor:
        with torch.no_grad():
            return diffusion_loss(transformer, of, context, torch.Generator().manual_seed(seed), torch.device("cpu"),
                                  torch.float32)

    assert torch.equal(loss(batch, 1), loss(batch, 1))
    assert not torch.equal(loss(batch, 1), loss(clean, 1))  # the noised copy, not the clean frame, conditions


def test_loader_workers_draw_the_same_random_numbers_the_step_would(synthetic_shards):
    """The randomness a loader worker process draws for micro-batch j is, to the bit, what the training process
    draws for its (step, micro-step) from the step's generator, and the loss from it is the same number."""
    from cogvx_dist.train.data.reader import make_loader
    from cogvx_dist.train.step.loss import StepDraws, step_seed

    model, folder = synthetic_shards([3, 2])
    info = describe_checkpoint(model)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    plan = BatchSplit(micro_batch_size=1, grad_accum_steps=2, dp_rank=1, dp_size=2)
    draws = StepDraws(context, seed=5, rank=1, grad_accum_steps=2, first_step=4, dp_size=2)  # resumed after step 3
    batches = MicroBatches(ShardIndex(folder), plan, seed=5, start_position=3 * 4, steps=3, draws=draws)
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, alpha=4.0), seed=0)
    for micro_index, batch in enumerate(make_loader(batches, num_workers=1)):
        step, micro_step = 4 + micro_index // 2, micro_index % 2
        generator = torch.Generator().manual_seed(step_seed(5, step, micro_step * 2 + 1))  # the unit in the step
        plain = {name: value for name, value in batch.items() if name != "randomness"}
        here = draws.for_step(plain, step, micro_step)
        assert here.keys() == batch["randomness"].keys()
        assert all(torch.equal(here[name], batch["randomness"][name]) for name in here)
        with torch.no_grad():
            from_loader = diffusion_loss(transformer, plain, context, batch["randomness"], torch.device("cpu"),
                                         torch.float32)
            from_generator = diffusion_loss(transformer, plain, context, generator, torch.device("cpu"),
                                            torch.float32)
        assert torch.equal(from_loader, from_generator)
    assert micro_index == 5


def test_a_unit_draws_the_same_random_numbers_at_any_world_size(synthetic_shards):
    """Elastic restarts change the world size with the global batch fixed: each of a step's units (its samples by
    position in the step) must get the same noise, timesteps and caption dropout whether 1, 2 or 4 ranks read
    it with 4, 2 or 1 accumulation steps."""
    from cogvx_dist.train.step.loss import StepDraws

    model, folder = synthetic_shards([5, 3])
    info = describe_checkpoint(model)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    index = ShardIndex(folder)
    by_world = []
    for ranks in (1, 2, 4):
        accum = 4 // ranks
        units: dict[tuple[int, tuple[str, ...]], dict[str, torch.Tensor]] = {}
        for rank in range(ranks):
            draws = StepDraws(context, seed=7, rank=rank, grad_accum_steps=accum, first_step=3, caption_dropout=0.5,
                              dp_size=ranks)
            batches = MicroBatches(index, BatchSplit(1, accum, rank, ranks), seed=7, start_position=2 * 4, steps=2,
                                   draws=draws)
            for micro_index in range(len(batches)):
                batch = batches[micro_index]
                step, micro_step = divmod(micro_index, accum)
                units[(step, micro_step * ranks + rank)] = (tuple(batch["keys"]), batch["randomness"])
        by_world.append(units)
    assert len(by_world[0]) == 8
    for units in by_world[1:]:
        assert units.keys() == by_world[0].keys()
        for unit, (keys, drawn) in units.items():
            assert keys == by_world[0][unit][0]
            assert all(torch.equal(drawn[name], by_world[0][unit][1][name]) for name in drawn)
    steps = {unit[0] for unit in by_world[0]}
    noises = [by_world[0][(step, 0)][1]["noise"] for step in sorted(steps)]
    assert not torch.equal(noises[0], noises[1])  # each step draws anew


def test_a_corrupt_index_that_matches_its_manifest_is_one_line_naming_it(synthetic_shards, tmp_path, capsys):
    """Someone rewrote bytes inside the keys of index.safetensors and updated the manifest's size and sha256 to match:
    the pre-flight failed with a bare UnicodeDecodeError (exit 1) naming no file. Now it is one line naming it."""
    import hashlib
    import shutil

    from cogvx_dist.core.shard_format import INDEX_NAME, MANIFEST_NAME, Manifest
    from cogvx_dist.core.storage import Store

    model, folder = synthetic_shards([3, 2])
    shards = tmp_path / "shards"
    shutil.copytree(folder, shards)
    index = shards / INDEX_NAME
    data = bytearray(index.read_bytes())
    start = bytes(data).index(Manifest.read(folder).sample_index(Store(folder)).key(0).encode())
    data[start:start + 2] = b"\xff\xfe"  # not UTF-8
    index.write_bytes(bytes(data))
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    manifest["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest))
    config = write_config(tmp_path / "run.yaml", model, shards, tmp_path / "out")
    code, _, err = cli(capsys, "train", "--config", str(config))
    assert_one_line_error(code, err, f"{INDEX_NAME}: sample key 0 is not UTF-8")
