"""Train tier: real DeepSpeed ranks (2 processes, gloo on CPU) training tiny models from prep shards."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXPipeline

from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import (
    LoraSettings,
    adapter_checksum,
    inject_lora,
    load_exported_lora,
    lora_parameters,
    lora_state_dict,
)
from cogvx_dist.core.run_folder import COMMIT_MARKER, RunFolder
from cogvx_dist.train.data.reader import ShardIndex
from tests.helpers import (
    LORA,
    evaluation_loss,
    free_port,
    launch,
    read_adapter,
    read_trace,
    s3_server,
    shared_folder,
    shm_buffers,
    stream_order,
    summary_of,
    transformer_output,
    upload,
    write_config,
)


@pytest.fixture(scope="module")
def zero_stage_run(prepped_2b, tmp_path_factory):
    """Factory: stage -> output of a 16-step 2-rank run under that DeepSpeed config (run once per session), which
    must not have left DeepSpeed's shared-memory buffers in /dev/shm."""
    model, shards = prepped_2b

    def train(stage: str, folder: Path) -> None:
        config = write_config(folder / "run.yaml", model, shards, folder / "run", deepspeed={"config": stage},
                              train={"max_steps": 16})
        port = free_port()
        result = launch(config, 2, "--master-port", str(port))
        assert result.returncode == 0, result.stderr[-3000:]
        assert not shm_buffers(port), "the run left DeepSpeed's shared-memory buffers in /dev/shm"

    def run(stage: str) -> Path:
        return shared_folder(tmp_path_factory, f"train-{stage}", functools.partial(train, stage)) / "run"

    return run


@pytest.mark.parametrize("stage", ["zero1", "zero3"])  # ZeRO-2, the default, trains in every crash/resume test
def test_zero_stage_trains_identical_adapters_and_loss_falls(prepped_2b, zero_stage_run, stage):
    model, shards = prepped_2b
    output = zero_stage_run(stage)
    summary = summary_of(output)
    assert summary["zero_stage"] == int(stage[-1]) and summary["world_size"] == 2
    assert len(set(summary["adapter_checksums"])) == 1 and len(summary["adapter_checksums"]) == 2

    exported = load_exported_lora(output / "lora")
    adapter, settings = exported.state, exported.settings
    assert (settings.rank, settings.alpha) == (8, 4.0)
    assert load_exported_lora(output / "lora").family == "CogVideoX-2b"
    assert load_exported_lora(RunFolder(output).complete_checkpoints()[-1][1] / "lora").family == "CogVideoX-2b"
    before, after = evaluation_loss(model, shards, None), evaluation_loss(model, shards, adapter)
    assert after < 0.9 * before, (before, after)

    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    for field in ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_wait_s", "peak_memory_gib"):
        assert metrics[-1][field] is not None and metrics[-1][field] >= 0, field
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs) and max(lrs) <= 2e-2  # warm-up, then cosine decay
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))

    # 8 samples in shards of 3, 3, 2 over 2 ranks: every rank ran all 16 steps (no hang, no short rank).
    trace = read_trace(output)
    assert len(trace) == 16 * 2 * 2
    assert {rank for _, _, rank, _ in trace} == {0, 1}

    # Checkpoints: the last two kept, each committed, holding no frozen weights.
    kept = RunFolder(output).complete_checkpoints()
    assert [step for step, _ in kept] == [12, 16]
    frozen_bytes = (model / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    for _, folder in kept:
        assert (folder / COMMIT_MARKER).is_file() and (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
        model_states = sum(p.stat().st_size for p in folder.glob("*model_states.pt"))
        assert model_states < frozen_bytes / 2, (model_states, frozen_bytes)


@pytest.mark.parametrize("stage", ["zero3_offload"])  # zero2_offload: test_faults.py resumes a run under it
def test_offload_configs_train_identical_adapters(prepped_2b, tmp_path, stage):
    """Optimizer and parameter offload to CPU: DeepSpeedCPUAdam does the update."""
    model, shards = prepped_2b
    output = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model, shards, output, deepspeed={"config": stage},
                          train={"max_steps": 4}, log={"sample_trace": False})
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(output)
    assert summary["zero_stage"] == int(stage[4]) and len(set(summary["adapter_checksums"])) == 1
    resolved = json.loads((output / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in resolved["optimizer"]["params"] or not resolved["optimizer"]["params"]["torch_adam"]


def test_exported_adapter_reproduces_trained_weights_in_diffusers(prepped_2b, zero_stage_run):
    """The trained fp32 weights, recovered from the ZeRO-3 optimizer partitions with DeepSpeed's own tool, give
    the same transformer output as the exported adapter loaded by CogVideoXPipeline.load_lora_weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model, _ = prepped_2b
    step_folder = RunFolder(zero_stage_run("zero3")).complete_checkpoints()[-1][1]
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(step_folder.parent), tag=step_folder.name,
                                                         exclude_frozen_parameters=True)
    trained = load_transformer(model)
    inject_lora(trained, LoraSettings(**LORA), seed=0)
    params = lora_parameters(trained)
    assert set(recovered) == set(params)
    with torch.no_grad():
        for name, value in recovered.items():
            params[name].copy_(value)

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(step_folder / "lora"))
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(trained),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transformer_output(load_transformer(model)), transformer_output(trained), atol=1e-4)


DROPOUT = {"caption_dropout": 0.3}


@pytest.fixture(scope="module")
def init_adapter(prepped_2b, tmp_path_factory) -> tuple[Path, str]:
    """(folder, checksum) of an adapter that diffusers' save_lora_weights wrote without its alpha, as the official
    CogVideo trainer exports it."""
    model, _ = prepped_2b
    transformer = inject_lora(load_transformer(model), LoraSettings(**LORA), seed=11)
    generator = torch.Generator().manual_seed(12)
    state = {name: (torch.randn(t.shape, generator=generator) * 0.02 if ".lora_B." in name else t.clone())
             for name, t in lora_state_dict(transformer).items()}
    folder = shared_folder(tmp_path_factory, "train-init-adapter",  # the path the shared runs' configs name
                           lambda folder: CogVideoXPipeline.save_lora_weights(str(folder),
                                                                              transformer_lora_layers=state))
    return folder, adapter_checksum(state)


@pytest.fixture(scope="module")
def features(prepped_2b, init_adapter) -> dict[str, dict]:
    """What the crash-and-resume runs train with besides the defaults, each of which must resume exactly too:
    caption dropout, a start from an existing adapter, the held-out loss (here on the training set itself) and the
    adapter's moving average."""
    _, shards = prepped_2b
    return {"train": {**DROPOUT, "ema_decay": 0.9},
            "lora": {"init_from": str(init_adapter[0]), "init_alpha": LORA["alpha"]},
            "data": {"eval_shards": str(shards)}, "log": {"eval_every_steps": 4, "eval_timesteps": [200, 500, 800]}}


def held_out(output: Path) -> dict[int, dict[str, float]]:
    """Step -> the eval/ metrics logged at it."""
    records = [json.loads(line) for line in RunFolder(output).metrics.read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in records if "eval/loss" in r}


def sections(features: dict[str, dict], **extra: dict) -> dict[str, dict]:
    """The config sections of `features`, with `extra` merged in."""
    merged = {name: dict(values) for name, values in features.items()}
    for name, values in extra.items():
        merged.setdefault(name, {}).update(values)
    return merged


@pytest.fixture(scope="module")
def straight_run(prepped_2b, init_adapter, features, tmp_path_factory):
    """The uninterrupted 2-rank run on local shards that crashed and resumed runs must match (made once per
    session)."""
    model, shards = prepped_2b

    def train(folder: Path) -> None:
        straight = folder / "run"
        config = write_config(folder / "straight.yaml", model, shards, straight, **sections(features))
        result = launch(config)
        assert result.returncode == 0, result.stderr[-3000:]
        # Step 0's adapter, as every rank built it, is the file's exactly.
        assert summary_of(straight)["initial_adapter_checksum"] == init_adapter[1]
        # The held-out loss before the first update, and after every 4 steps: falling on the set it trains on.
        evaluations = held_out(straight)
        assert sorted(evaluations) == [0, 4, 8]
        assert set(evaluations[8]) == {"eval/loss", "eval/loss_t200", "eval/loss_t500", "eval/loss_t800"}
        assert evaluations[8]["eval/loss"] < evaluations[0]["eval/loss"], evaluations

    return shared_folder(tmp_path_factory, "train-straight", train) / "run"


def assert_same_run(straight, other) -> None:
    """Bit-identical adapters (and averages, where kept) and the same samples in the same order on every rank."""
    for folder in ("lora", "lora_ema"):
        if folder == "lora_ema" and not (straight / folder).exists():
            continue
        straight_adapter, other_adapter = read_adapter(straight / folder), read_adapter(other / folder)
        assert straight_adapter.keys() == other_adapter.keys()
        for name in straight_adapter:
            assert torch.equal(straight_adapter[name], other_adapter[name]), (folder, name)
    assert read_trace(straight) == read_trace(other)
    assert held_out(straight) == held_out(other)  # the same weights give the same held-out loss, to the bit


def test_crash_and_resume_auto_matches_uninterrupted_run(prepped_2b, features, straight_run, tmp_path):
    model, shards = prepped_2b
    straight = straight_run

    crashed = tmp_path / "crashed"
    config = write_config(tmp_path / "crashed.yaml", model, shards, crashed, **sections(features))
    port = free_port()
    first = launch(config, 2, "--master-port", str(port), env={FAULT_ENV: "train.committed=4"})
    assert first.returncode != 0
    assert not shm_buffers(port), "a crashed run left its shared-memory buffers in /dev/shm"
    assert [step for step, _ in RunFolder(crashed).complete_checkpoints()] == [4]
    assert not RunFolder(crashed).summary.exists()
    second = launch(config, 2, "checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert summary_of(crashed)["resumed_from_step"] == 4

    assert_same_run(straight, crashed)

    # Resume the crashed run's step-4 checkpoint with one rank (same global batch): same global sample order.
    one_rank = tmp_path / "one-rank"
    config = write_config(tmp_path / "one.yaml", model, shards, one_rank,
                          **sections(features, train={"grad_accum_steps": 4},
                                     checkpoint={"resume": str(crashed / "checkpoints" / "step-00000004")}))
    result = launch(config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stream_order(one_rank, 1) == [row for row in stream_order(straight, 2) if row[0] > 4]


@pytest.fixture(scope="module")
def i2v_with_copies(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(model, shards) of the tiny 5b-I2V with 3 noised copies of each conditioning frame."""
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards

    model, shards = tiny_checkpoint("CogVideoX-5b-I2V"), tmp_path_factory.mktemp("i2v-copies")
    write_synthetic_shards(shards, model, [4], image_noise_samples=3)
    return model, shards


@pytest.mark.parametrize("ranks, stage, data", [(2, "zero3", "a mixture with stills"),
                                                 (1, "zero3", "i2v copies")])
def test_every_feature_resumes_exactly_and_the_average_is_the_hand_computed_one(
        prepped_2b, clips_and_stills, synthetic_shards, i2v_with_copies, init_adapter, features, tmp_path, ranks,
        stage, data):
    """Everything the crash/resume runs use (ZeRO-2 on 2 ranks is the crash/resume test above), under ZeRO-3 on 2
    ranks (the average sharded like the parameters) over a 3:1 mixture of two folders, one of clips and single
    images, and on 1 rank for image-to-video with noised first-frame copies (there without the 2b adapter to start
    from): a run killed after its step-2 checkpoint and resumed ends bit-identical to the uninterrupted one, the
    metrics count the samples each source gave, and the exported average equals the EMA computed here from the
    initial adapter and the adapter each step's checkpoint saved."""
    from cogvx_dist.core.lora import read_adapter as read_adapter_file
    from cogvx_dist.train.data.mixture import MixtureStream

    mixed = data != "i2v copies"
    model, shards = (prepped_2b[0], clips_and_stills[0]) if mixed else i2v_with_copies
    sources = {}
    if mixed:
        synthetic = synthetic_shards([4, 4])[1]
        sources = {"sources": [{"shards": str(shards), "weight": 3, "name": "prepped"},
                               {"shards": str(synthetic), "weight": 1, "name": "synthetic"}]}
    decay = 0.6
    fresh_adapter = {} if mixed else {"init_from": "", "init_alpha": 0.0}
    extra = sections(features, deepspeed={"config": stage}, train={"max_steps": 4, "ema_decay": decay},
                     checkpoint={"every_steps": 1, "keep_last": 5}, data={"eval_shards": str(shards), **sources},
                     log={"eval_every_steps": 2}, lora=fresh_adapter)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    for output in (straight, crashed):
        write_config(tmp_path / f"{output.name}.yaml", model, "" if mixed else shards, output, **extra)
    assert launch(tmp_path / "straight.yaml", ranks).returncode == 0
    assert launch(tmp_path / "crashed.yaml", ranks, env={FAULT_ENV: "train.committed=2"}).returncode != 0
    resumed = launch(tmp_path / "crashed.yaml", ranks)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(crashed)["resumed_from_step"] == 2 and summary_of(crashed)["zero_stage"] == int(stage[-1])
    assert summary_of(crashed)["world_size"] == ranks
    assert_same_run(straight, crashed)
    assert sorted(held_out(straight)) == [0, 2, 4]
    if mixed:
        synthetic_keys = {ShardIndex(synthetic).key(i) for i in range(8)}
        stills = clips_and_stills[1]
        for rank in range(ranks):  # every rank trained on clips and stills of the prepped folder
            kinds = {key in stills for _, _, r, key in read_trace(straight) if r == rank and key not in synthetic_keys}
            assert kinds == {True, False}, f"rank {rank} trained on one kind only"
        expected = MixtureStream([6, 8], [3, 1], seed=5).seen(4 * 2 * ranks)  # 4 steps of 2 samples a rank, seed 5
        for run in (straight, crashed):
            last = json.loads(RunFolder(run).metrics.read_text().splitlines()[-1])
            assert [last["samples_seen/prepped"], last["samples_seen/synthetic"]] == expected, run.name
        keys = {key for *_, key in read_trace(straight)}
        assert keys & synthetic_keys and keys - synthetic_keys  # both folders gave samples

    if fresh_adapter:  # the seed's adapter, as every rank injects it
        initial = lora_state_dict(inject_lora(load_transformer(model), LoraSettings(**LORA), seed=5))
    else:
        initial = read_adapter_file(init_adapter[0], LORA["alpha"], "").state
    average = {name: t.float().clone() for name, t in initial.items()}
    for step in range(1, 5):
        weights = read_adapter(RunFolder(straight).checkpoint(step) / "lora")
        for name in average:
            average[name].mul_(decay).add_(weights[name].float(), alpha=1 - decay)
    exported = read_adapter(straight / "lora_ema")
    assert exported.keys() == average.keys()
    for name in average:
        assert torch.equal(exported[name], average[name]), name
    assert not torch.equal(exported[name], read_adapter(straight / "lora")[name])  # an average, not the weights


def test_a_run_from_s3_crashed_and_resumed_equals_the_local_run(prepped_2b, features, straight_run, tmp_path):
    """Exact order from an S3-compatible server on loopback: ranged reads by both ranks, a crash after the step-4
    checkpoint, resume: bit-identical to the uninterrupted run on the local shards."""
    model, shards = prepped_2b
    with s3_server() as env:
        upload(shards, "s3://datasets/clips", env)
        crashed = tmp_path / "crashed"
        config = write_config(tmp_path / "s3.yaml", model, "s3://datasets/clips", crashed,
                              **sections(features, data={"verify": "sha256", "num_workers": 1}))
        first = launch(config, env={**env, FAULT_ENV: "train.committed=4"})
        assert first.returncode != 0
        second = launch(config, 2, "checkpoint.resume=auto", env=env)
        assert second.returncode == 0, second.stderr[-3000:]
    assert summary_of(crashed)["resumed_from_step"] == 4
    assert_same_run(straight_run, crashed)
    assert "testing" not in "".join(p.read_text(errors="replace") for p in crashed.rglob("*")
                                    if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt"))


def test_streaming_over_http_trains_on_two_ranks(prepped_2b, tmp_path):
    """Shards served over HTTP on loopback; every rank streams, runs all steps, and ends identical."""
    import functools
    import http.server
    import threading

    model, shards = prepped_2b
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        output = tmp_path / "run"
        config = write_config(tmp_path / "run.yaml", model, shards, output, train={"max_steps": 4},
                              data={"shards": url, "streaming": True})
        result = launch(config)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        server.shutdown()
    summary = summary_of(output)
    assert len(summary["adapter_checksums"]) == 2 and len(set(summary["adapter_checksums"])) == 1
    keys = {key for _, _, _, key in read_trace(output)}
    assert len(read_trace(output)) == 4 * 2 * 2 and keys <= {ShardIndex(shards).key(i) for i in range(8)}


@pytest.fixture(scope="module")
def clips_and_stills(tiny_checkpoint, tmp_path_factory) -> tuple[Path, set[str]]:
    """(shards, keys of the stills) of a prepped 2b dataset of 3 clips and 3 single images."""
    from cogvx_dist.core.shard_format import sample_key
    from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep

    root = tmp_path_factory.mktemp("clips-and-stills")
    dataset = make_synthetic_dataset(root / "data", count=3, frames=10, height=48, width=64, layout="jsonl", stills=3)
    prepped = run_prep(PrepConfig(model=str(tiny_checkpoint("CogVideoX-2b")), data=str(dataset.data),
                                  out=str(root / "shards"), storage_dtype="float32", progress=False))
    assert prepped.encoded == 6
    return root / "shards", {sample_key(name) for name in dataset.good if "still_" in name}

