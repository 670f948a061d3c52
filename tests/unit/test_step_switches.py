"""The speed switches of a training step (attention kernel, ...): each trains like the eager default, in one
process on the tiny model, float32 on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.loading import describe_checkpoint, load_scheduler
from cogvx_dist.core.lora import LoraSettings
from cogvx_dist.train.data.reader import ShardIndex, collate
from cogvx_dist.train.step.loss import LossContext, diffusion_loss
from cogvx_dist.train.step.model import attention_kernels, build_model, check_attention, choose_attention
from tests.helpers import clean_env, free_port

STEPS = 10


def train_losses(model_path, batches: list[dict], checkpointing: int = 0,
                 around: Callable[[], AbstractContextManager] = nullcontext, compile_blocks: bool = False,
                 after_step: Callable[[], None] = lambda: None) -> list[float]:
    """Losses of AdamW steps on the tiny model, one batch each with fixed draws: the reference loop a switch must
    reproduce."""
    info = describe_checkpoint(model_path)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model_path))
    transformer = build_model(str(model_path), "float32", LoraSettings(rank=4, alpha=4.0), seed=0,
                              checkpoint_every=checkpointing, compile_blocks=compile_blocks)
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step, batch in enumerate(batches):
        with around():
            loss = diffusion_loss(transformer, batch, context, torch.Generator().manual_seed(step),
                                  torch.device("cpu"), torch.float32)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        after_step()
    return losses


@pytest.fixture(scope="module")
def reference(synthetic_shards):
    model, shards = synthetic_shards([3, 2])
    index = ShardIndex(shards)
    batches = [collate([index.read(step % len(index))[0]], [index.key(step % len(index))]) for step in range(STEPS)]
    return model, batches, train_losses(model, batches)


def test_auto_attention_takes_cudnn_on_hopper_and_flash_before_it():
    assert choose_attention("auto", "cuda", (9, 0), True)[1][0] == "cudnn"
    assert choose_attention("auto", "cuda", (9, 0), False)[1][0] == "flash"
    assert choose_attention("auto", "cuda", (8, 0), True)[1] == ["flash", "efficient", "math"]
    assert choose_attention("auto", "cpu", None, False)[1] == []
    assert choose_attention("math", "cuda", (9, 0), True) == ("math", ["math"])


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_attention_kernels_the_cpu_has_train_like_the_default(reference, kernel):
    model, batches, losses = reference
    check_attention(kernel, [kernel], torch.device("cpu"), torch.float32, 8)
    switched = train_losses(model, batches, around=lambda: attention_kernels([kernel]))
    assert switched == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0] or max(losses) > min(losses)  # the steps really trained
    # ...and the kernel asked for is the one that ran.
    query = torch.randn(1, 2, 16, 8)
    with torch.profiler.profile() as profile, attention_kernels([kernel]):
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    ran = {event.name for event in profile.events()}
    assert any({"math": "attention_math", "flash": "flash_attention"}[kernel] in name for name in ran), ran


def test_a_kernel_that_cannot_run_here_is_one_line():
    with pytest.raises(CogvxError, match="model.attention_backend efficient cannot run on cpu in torch.float32"):
        check_attention("efficient", ["efficient"], torch.device("cpu"), torch.float32, 8)


def test_checkpointing_any_share_of_blocks_trains_like_none(reference):
    model, batches, losses = reference
    for every in (1, 2):
        assert train_losses(model, batches, checkpointing=every) == pytest.approx(losses, rel=1e-4)


OPTIMIZER_PROBE = """
import json, os, sys
import torch
from cogvx_dist.train.ds_config import load_ds_config, optimizer_in_use, resolve_ds_config, run_values
from cogvx_dist.train.engine import Engine, init_distributed, shutdown

init_distributed(timeout_s=120)
values = run_values(micro_batch_size=1, grad_accum_steps=1, max_grad_norm=1.0, lr=0.01, betas=[0.9, 0.95], eps=1e-8,
                    weight_decay=0.01, bf16=False)
found = {}
for name in sys.argv[1:]:
    for device in ("gpu", "cpu"):
        config = resolve_ds_config(load_ds_config(name), values, on_gpu=device == "gpu")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        engine = Engine(model, config, lambda step: 1.0)
        losses = []
        for x in torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)):
            loss = engine(x).square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        built = engine._base_optimizer()
        found[f"{name} {device}"] = {
            "says": optimizer_in_use(config), "built": f"{type(built).__module__}.{type(built).__name__}",
            "defaults": {k: built.defaults.get(k) for k in ("lr", "betas", "eps", "weight_decay", "fused")},
            "losses": losses}
shutdown()
print(json.dumps(found), flush=True)
os._exit(0)  # past the interpreter's teardown of torch and DeepSpeed
"""


def test_deepspeed_builds_the_adamw_the_project_chooses():
    """The optimizer is this project's choice (ds_config._choose_adam): torch's fused AdamW on GPUs, its default
    AdamW on CPUs, never DeepSpeed's JIT-built FusedAdam, asked for through DeepSpeed config keys (`torch_adam`,
    `fused`) that the installed DeepSpeed must read as meant. For every shipped config without optimizer offload
    (offload runs DeepSpeed's CPU Adam: tests/e2e/test_train_runs.py), resolved for a GPU and for a CPU and handed
    to the project's Engine (one rank, DeepSpeed on the CPU, a small model): DeepSpeed builds torch.optim.AdamW,
    fused exactly where optimizer_in_use (the run's first log line) says so, with the run config's
    hyper-parameters, and steps with it; either choice trains the same."""
    from cogvx_dist.train.ds_config import DS_CONFIG_DIR, load_ds_config, offloads_optimizer

    names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json") if not offloads_optimizer(load_ds_config(p.stem)))
    assert {"zero1", "zero2", "zero3"} <= set(names)
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-c", OPTIMIZER_PROBE, *names], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    found = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    for name in names:
        for device in ("gpu", "cpu"):
            run = found[f"{name} {device}"]
            assert run["built"] == "torch.optim.adamw.AdamW" and run["says"].startswith("torch.optim.AdamW"), run
            assert bool(run["defaults"]["fused"]) == (device == "gpu") == ("fused" in run["says"]), run
            assert run["defaults"] | {"fused": None} == {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8,
                                                         "weight_decay": 0.01, "fused": None}, run
            assert len(set(run["losses"])) == 3, run  # three steps that moved the weights
        assert found[f"{name} gpu"]["losses"] == pytest.approx(found[f"{name} cpu"]["losses"], rel=1e-5)


def test_auto_checkpointing_takes_the_least_recomputation_that_fits(synthetic_shards):
    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.memory.runs import least_recompute_that_fits, resolve_checkpointing
    from cogvx_dist.train.preflight import preflight

    needed = {0: 50, 8: 40, 4: 35, 3: 33, 2: 30, 1: 20}
    assert least_recompute_that_fits(needed, 100) == 0
    assert least_recompute_that_fits(needed, 36) == 4  # the fewest blocks recomputed that fit
    assert least_recompute_that_fits(needed, 25) == 1
    assert least_recompute_that_fits(needed, 10) is None

    model, shards = synthetic_shards([3, 2])
    config = load_config(RunConfig, None, [f"model.path={model}", f"data.shards={shards}", "model.dtype=float32",
                                           "model.gradient_checkpointing=auto"])
    checks = preflight(config)
    unknown, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config, 2, None)
    assert unknown.model.gradient_checkpointing == 1 and "no GPU memory to plan against" in why
    config.plan.gpu_memory = "1TiB"
    roomy, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config, 2, None)
    assert roomy.model.gradient_checkpointing == 0 and why.startswith("gradient checkpointing auto: none")
    config.plan.gpu_memory = "1MiB"
    cramped, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config, 2, None)
    assert cramped.model.gradient_checkpointing == 1 and "even that is predicted" in why


@pytest.mark.slow  # two real inductor compilations on the CPU
def test_compiled_blocks_train_like_eager_and_compile_once_per_clip_size(tiny_checkpoint):
    """10 steps over two clip sizes (5 steps each): the same losses as eager within 1e-4, and torch compiles when
    a size first comes, never again for a step of a size it has seen."""
    from torch._dynamo.utils import counters

    from cogvx_dist.core.shard_format import LATENT_LOGVAR, LATENT_MEAN, PROMPT_EMBEDS

    model = tiny_checkpoint("CogVideoX-2b")
    info = describe_checkpoint(model)
    generator = torch.Generator().manual_seed(0)

    def batch(height: int, width: int) -> dict:
        mean = torch.randn(1, 16, 3, height, width, generator=generator)
        return {LATENT_MEAN: mean, LATENT_LOGVAR: torch.full_like(mean, -6.0),
                PROMPT_EMBEDS: torch.randn(1, 226, info.transformer_config["text_embed_dim"], generator=generator)}

    batches = [batch(4, 6)] * 5 + [batch(8, 6)] * 5

    def run(compile_blocks: bool) -> tuple[list[float], list[int]]:
        torch._dynamo.reset()
        compiled: list[int] = []
        losses = train_losses(model, batches, checkpointing=1, compile_blocks=compile_blocks,
                              after_step=lambda: compiled.append(counters["frames"]["ok"]))
        return losses, compiled

    eager, _ = run(False)
    counters.clear()
    losses, compiled = run(True)
    assert losses == pytest.approx(eager, rel=1e-4)
    new_graphs = [compiled[0]] + [after - before for before, after in zip(compiled, compiled[1:])]
    assert new_graphs[0] > 0 and new_graphs[5] > 0, new_graphs  # each clip size compiles when it first comes
    assert new_graphs[1:5] == [0] * 4 and new_graphs[6:] == [0] * 4, new_graphs  # ...and only then
