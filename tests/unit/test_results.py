"""Results in one process: the sampler (adapters of other models and families, image-to-video), the watcher's
record and run lookup, and `cogvx report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import LoraSettings, export_lora, inject_lora, lora_state_dict
from cogvx_dist.core.run_folder import METRICS
from tests.helpers import assert_one_line_error, cli

SETTINGS = LoraSettings(rank=4, alpha=4.0)


@pytest.fixture(scope="module")
def model_2b(tiny_checkpoint) -> Path:
    return tiny_checkpoint("CogVideoX-2b")


def test_a_bad_lora_path_is_one_line(model_2b, tmp_path, capsys):
    common = ["sample", "--model", str(model_2b), "--prompt", "a red square moves left", "--out",
              str(tmp_path / "x.mp4")]
    assert_one_line_error(*cli(capsys, *common, "--lora", str(tmp_path / "nope"))[::2], "cogvx sample: error:",
                          "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*cli(capsys, *common, "--lora", str(empty))[::2], "cogvx sample: error:",
                          "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--height", "40"], "resolution 40x48 is not a positive multiple of 16"),
    (["--width", "-16"], "resolution 32x-16 is not a positive multiple of 16"),
    (["--frames", "0"], "0 frames is not valid for CogVideoX-2b"),  # 0 is not "the checkpoint's default"
    (["--frames", "10"], "10 frames is not valid for CogVideoX-2b"),
    (["--fps", "0"], "--fps must be at least 1"),
    (["--grid-columns", "-1"], "--grid-columns must be at least 0"),
    (["--inference-steps", "0"], "--inference-steps must be at least 1"),
])
def test_a_clip_the_family_cannot_draw_is_one_line(model_2b, tmp_path, capsys, args, fragment):
    """Sizes diffusers would only refuse deep inside the transformer, and settings that would write a broken mp4."""
    out = tmp_path / "x.mp4"
    assert_one_line_error(*cli(capsys, "sample", "--model", str(model_2b), "--prompt", "x", "--out", str(out),
                               "--inference-steps", "1", *args)[::2], "cogvx sample: error:", fragment)
    assert not out.exists()


def test_watch_options_out_of_range_are_one_line(tmp_path, capsys):
    for option, value in (("--interval", "0"), ("--max-wait", "-1"), ("--stop-after", "-2")):
        assert_one_line_error(*cli(capsys, "sample", "--watch", str(tmp_path), "--prompt", "x", option, value)[::2],
                              f"{option} must be")


def test_lora_for_another_model_is_rejected_in_process(model_2b, tmp_path):
    """An adapter naming layers this transformer lacks (a deeper model's) fails with one clear message."""
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.sample import Sampler, SampleSettings

    transformer = load_transformer(model_2b)
    inject_lora(transformer, SETTINGS, seed=0)
    state = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v
             for k, v in lora_state_dict(transformer).items()}
    export_lora(state, SETTINGS, tmp_path / "foreign")
    sampler = Sampler(model_2b, device="cpu")
    with pytest.raises(CogvxError, match="transformer_blocks.7.* another model"):
        sampler.set_lora(tmp_path / "foreign")
    with pytest.raises(CogvxError, match="text-to-video"):
        sampler.generate("x", SampleSettings(num_inference_steps=1), image=tmp_path / "first.png")


def test_lora_from_another_family_of_equal_shapes_is_refused_unless_allowed(tiny_checkpoint, tmp_path):
    """5b and 5b-I2V adapters have the same shapes: only the family recorded at export tells them apart."""
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.lora import load_exported_lora
    from cogvx_dist.results.sample import Sampler

    source, target = tiny_checkpoint("CogVideoX-5b"), tiny_checkpoint("CogVideoX-5b-I2V")
    transformer = load_transformer(source)
    inject_lora(transformer, SETTINGS, seed=0)
    export_lora(lora_state_dict(transformer), SETTINGS, tmp_path / "lora-5b", family="CogVideoX-5b")
    assert load_exported_lora(tmp_path / "lora-5b").family == "CogVideoX-5b"

    with pytest.raises(CogvxError, match=r"trained on CogVideoX-5b, but .* is CogVideoX-5b-I2V; pass --allow-other"):
        Sampler(target, device="cpu").set_lora(tmp_path / "lora-5b")
    sampler = Sampler(target, device="cpu", allow_other_family=True)
    sampler.set_lora(tmp_path / "lora-5b")  # the shapes fit: it applies when asked to
    assert sampler.lora == tmp_path / "lora-5b"
    # The record is not PEFT's base_model_name_or_path, which PEFT would look up on the hub as a repository.
    assert [c.base_model_name_or_path for c in sampler.pipe.transformer.peft_config.values()] == [None]

    # Shapes that do not fit are reported as such, with no suggestion that the flag would help.
    state = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v
             for k, v in lora_state_dict(transformer).items()}
    export_lora(state, SETTINGS, tmp_path / "deeper", family="CogVideoX-5b")
    with pytest.raises(CogvxError, match=r"trained on CogVideoX-5b\) targets transformer_blocks.7") as refused:
        Sampler(target, device="cpu", allow_other_family=True).set_lora(tmp_path / "deeper")
    assert "--allow-other-family" not in str(refused.value)
    Sampler(source, device="cpu").set_lora(tmp_path / "lora-5b")  # its own family

    # Files without the record (other tools, older exports) are checked by shape only.
    export_lora(lora_state_dict(transformer), SETTINGS, tmp_path / "unrecorded")
    assert load_exported_lora(tmp_path / "unrecorded").family is None
    Sampler(target, device="cpu").set_lora(tmp_path / "unrecorded")


def test_image_to_video_family_samples_from_a_first_frame(tiny_checkpoint, tmp_path):
    from PIL import Image

    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.sample import Sampler, SampleSettings

    sampler = Sampler(tiny_checkpoint("CogVideoX-5b-I2V"), device="cpu")
    assert type(sampler.pipe).__name__ == "CogVideoXImageToVideoPipeline"
    with pytest.raises(CogvxError, match="--image"):
        sampler.generate("a red square moves left", SampleSettings(num_inference_steps=1))
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "first.png")
    frames = sampler.generate("a red square moves left", SampleSettings(num_inference_steps=1),
                              image=tmp_path / "first.png")
    assert frames.shape == (9, 32, 48, 3) and 0.0 <= frames.min() and frames.max() <= 1.0


@pytest.mark.parametrize("text", ["{not json", '{"model": {}}', '{"model": "m"}', "[]", '{"model": {"path": 3}}'])
def test_watch_with_a_broken_run_config_is_one_line(tmp_path, text):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.watch import run_model

    (tmp_path / "run_config.json").write_text(text)
    with pytest.raises(CogvxError, match=re.escape(str(tmp_path / "run_config.json")) + ".*pass --model") as info:
        run_model(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "run_config.json").write_text('{"model": {"path": "/models/2b"}}')
    assert run_model(tmp_path) == "/models/2b"


def test_watch_once_validates_each_committed_checkpoint_once(model_2b, tmp_path):
    from cogvx_dist.core.run_folder import RunFolder
    from cogvx_dist.results.sample import SampleSettings
    from cogvx_dist.results.watch import SamplerSpec, WatchOptions, watch_run
    from tests.helpers import write_checkpoint

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.run_config.write_text(json.dumps({"model": {"path": str(model_2b)}}))
    for step in (2, 4):
        write_checkpoint(run.root, model_2b, step=step, seed=step)
    (run.checkpoint(6) / "lora").mkdir(parents=True)  # a save in progress: no commit marker
    settings = SampleSettings(num_inference_steps=1, guidance_scale=1.0)
    options = WatchOptions(once=True, baseline=False)
    first = watch_run(run.root, ["a red square moves left"], settings, options, SamplerSpec(device="cpu"))
    assert first.validated == [2, 4] and "--once" in first.reason
    assert sorted(json.loads(run.validation_record.read_text())["steps"]) == ["2", "4"]
    assert len(list((run.validation / "step-00000004").glob("*.mp4"))) == 1
    again = watch_run(run.root, ["a red square moves left"], settings, options, SamplerSpec(device="cpu"))
    assert again.validated == []  # the record says both are done


def test_watch_samples_the_adapter_average_where_a_checkpoint_has_one(model_2b, tmp_path, capsys):
    from cogvx_dist.core.run_folder import RunFolder
    from cogvx_dist.results.sample import SampleSettings
    from cogvx_dist.results.watch import SamplerSpec, WatchOptions, watch_run
    from tests.helpers import make_adapter, write_checkpoint

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.run_config.write_text(json.dumps({"model": {"path": str(model_2b)}}))
    write_checkpoint(run.root, model_2b, step=2, seed=2)  # trained without train.ema_decay
    folder = write_checkpoint(run.root, model_2b, step=4, seed=4)
    make_adapter(model_2b, folder / "lora_ema", seed=5, strength=2.0)
    options = WatchOptions(once=True, baseline=False, average=True)
    result = watch_run(run.root, ["a red square moves left"], SampleSettings(num_inference_steps=1,
                       guidance_scale=1.0), options, SamplerSpec(device="cpu"))
    assert result.validated == [2, 4]
    steps = json.loads(run.validation_record.read_text())["steps"]
    assert steps["2"]["ema"] is None and steps["4"]["ema"]["folder"] == "ema"
    clips = steps["4"]["clips"][0], steps["4"]["ema"]["clips"][0]
    assert (run.validation / "step-00000004" / "ema" / clips[1]["mp4"]).is_file()
    assert (run.validation / "step-00000004" / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert clips[0]["mean_pixel"] != clips[1]["mean_pixel"]  # the average is another adapter than the weights
    assert_one_line_error(*cli(capsys, "sample", "--model", str(model_2b), "--prompt", "x", "--ema")[::2],
                          "--ema goes with --watch")


def test_validation_record_is_replaced_whole(tmp_path):
    from cogvx_dist.results.watch import load_record, write_record

    path = tmp_path / "validated.json"
    write_record(path, {"steps": {"2": {"folder": "step-00000002"}}})
    write_record(path, {"steps": {"2": {}, "4": {}}})
    assert load_record(path) == {"steps": {"2": {}, "4": {}}}
    assert [p.name for p in tmp_path.iterdir()] == ["validated.json"]  # no temporary left behind


def _step_time(step: int) -> float:
    return (0.2, 0.4, 0.8)[step % 3]


def _write_metrics(run: Path, steps: int) -> None:
    from cogvx_dist.train.metrics import MetricsWriter

    writer = MetricsWriter(run, enabled=True, tensorboard=False)
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        loss = 1.0 + 0.8 * np.exp(-step / 8) + 0.05 * rng.standard_normal()
        # 4 samples a step in a varying time: fast and slow steps, so a time-weighted rate differs from a mean.
        step_time = _step_time(step)
        writer.log(step, {"loss": float(loss), "grad_norm": 0.5, "lr": 1e-3 * min(1, step / 3),
                          "samples_per_s": 4 / step_time, "tokens_per_s": 240.0 * 4 / step_time,
                          "step_time_s": step_time, "data_wait_s": 0.01, "peak_memory_gib": 1.5 + step / 100,
                          "samples_seen": 4 * step})
    writer.close()


def test_report_writes_plots_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 30)
    code, stdout, stderr = cli(capsys, "report", str(run))
    assert code == 0, stderr[-2000:]
    from PIL import Image

    for name in ("loss", "throughput", "memory", "lr"):
        image = Image.open(run / "report" / f"{name}.png")
        assert image.size[0] > 300 and image.size[1] > 200, name
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["loss_falls"] is True
    assert summary["peak_memory_gib"] == pytest.approx(1.8)
    # Throughput is total samples over total time of the steady steps (2..30, step 1 includes warm-up), not the
    # plain mean of the per-step rates, which overweights the fast steps.
    steady = range(2, 31)
    time_weighted = 4 * len(steady) / sum(_step_time(s) for s in steady)
    plain_mean = float(np.mean([4 / _step_time(s) for s in steady]))
    assert summary["samples_per_s"] == pytest.approx(time_weighted)
    assert summary["samples_per_s"] != pytest.approx(plain_mean, rel=0.05)
    assert summary["tokens_per_s"] == pytest.approx(240 * time_weighted)
    assert "falling" in (run / "report" / "summary.txt").read_text() and "samples/s" in stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*cli(capsys, "report", str(empty))[::2], "metrics.jsonl")


def test_report_shows_the_held_out_loss(tmp_path, capsys):
    """Held-out evaluations (an evaluation-only record at step 0, then beside training records) go into loss.png's
    data and the summary; the step-0 record does not count as a training step."""
    from cogvx_dist.train.metrics import MetricsWriter

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 12)
    writer = MetricsWriter(run, enabled=True, tensorboard=True)
    writer.log(0, {"eval/loss": 2.0, "eval/loss_t100": 1.5})
    writer.log(12, {"loss": 1.1, "eval/loss": 1.25, "eval/loss_t100": 1.0})
    writer.close()
    code, stdout, stderr = cli(capsys, "report", str(run))
    assert code == 0, stderr[-2000:]
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_steps"] == [0, 12]
    assert (summary["eval_loss_first"], summary["eval_loss_last"]) == (2.0, 1.25)
    assert "held-out loss: 2.0000 (step 0) -> 1.2500 (step 12)" in stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "eval/loss" in events.Tags()["scalars"] and "train/eval/loss" not in events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("eval/loss")] == [2.0, 1.25]


def test_report_skips_a_torn_last_metrics_line(tmp_path):
    """A run still writing (or killed mid-write) leaves half a line at the end: the report uses the whole lines."""
    from cogvx_dist.core.metric_table import read_metrics
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 6)
    with open(run / METRICS, "a") as handle:
        handle.write('{"step": 7, "loss": 1.2, "samples_')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    summary = write_report(run)
    assert summary["steps"] == 6 and summary["last_step"] == 6


@pytest.mark.parametrize("bad,message", [
    ('{"step": 3, "loss": ', "line 3: not JSON"),  # torn, but not the last line: the file is damaged
    ("[1, 2]", "line 3: expected a JSON object, got list"),
    ('{"loss": 1.0}', 'line 3: no integer "step"'),
])
def test_report_names_file_and_line_of_a_bad_metrics_line(tmp_path, bad, message):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.metric_table import read_metrics
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": 1, "loss": 1.0}), json.dumps({"step": 2, "loss": 0.9}), bad,
             json.dumps({"step": 4, "loss": 0.8})]
    (run / METRICS).write_text("\n".join(lines) + "\n")
    with pytest.raises(CogvxError, match=f"{METRICS} {message}"):
        read_metrics(run)
    with pytest.raises(CogvxError, match=message):
        write_report(run)


@pytest.mark.parametrize("name,text", [("train_summary.json", '{"world_size": 2'),
                                       ("train_summary.json", "[]"),
                                       ("validation/validated.json", "not json")])
def test_report_names_a_broken_run_file(tmp_path, capsys, name, text):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 3)
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(text)
    with pytest.raises(CogvxError, match=re.escape(f"{run / name}: ")):
        write_report(run)
    assert_one_line_error(*cli(capsys, "report", str(run))[::2], str(run / name))




def test_the_metric_table_names_every_logged_metric_and_keeps_tensorboard_tags():
    """A run's metric names all have a row (the writer refuses others, naming the table), and TensorBoard keeps the
    tags runs have always had: `train/NAME`, and eval metrics under their own `eval/` section."""
    import torch

    from cogvx_dist.core.metric_table import METRICS, PLOTS, metric, plotted, tensorboard_tag
    from cogvx_dist.train.metrics import MetricsWriter, StepMeter

    window = StepMeter(4, torch.device("cpu"))
    window.step_done(torch.tensor(1.0))
    for name in window.values(1e-4, 0.5, 4):
        assert metric(name).name == name
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("eval/loss") == "eval/loss"
    assert tensorboard_tag("eval/loss_t500") == "eval/loss_t500"
    assert tensorboard_tag("samples_seen/clips") == "train/samples_seen/clips"
    assert {row.kind for row in METRICS} <= {"window", "step", "total", "setting"}
    assert all(row.plot is None or row.plot in PLOTS for row in METRICS) and all(plotted(key) for key in PLOTS)
    with pytest.raises(KeyError, match="metric_table.METRICS"):
        MetricsWriter(".", enabled=False, tensorboard=False).log(1, {"loss_typo": 1.0})


def test_the_demo_comparison_picture_shows_each_frame_large_in_three_labelled_rows(tmp_path):
    """The demo's comparison.png: the tiny 32x48 frames enlarged by whole-pixel blocks (not smoothed) to at least 128
    px tall, in the rows without LoRA, with LoRA and their amplified difference, a column per frame with its time."""
    from PIL import Image

    from cogvx_dist.results.demo import COMPARISON_ROWS, comparison_png

    generator = np.random.default_rng(0)
    without = generator.random((9, 32, 48, 3), dtype=np.float32) * 0.8
    with_lora = without + 0.1  # an exact, even difference: 0.1 x 8 is the first listed factor reaching half scale
    layout = comparison_png(without, with_lora, tmp_path / "comparison.png", title="a red square", fps=8,
                            subtitle="seed 0")

    assert layout.rows == list(COMPARISON_ROWS) == ["without LoRA", "with LoRA", "difference"]
    assert len(layout.origins) == 3 and all(len(row) == 9 for row in layout.origins)
    assert layout.cell == (48 * layout.scale, 32 * layout.scale) and layout.cell[1] >= 128
    assert layout.columns[0] == "frame 0\n0.000 s" and layout.columns[8] == "frame 8\n1.000 s"
    assert layout.amplify == 8
    picture = np.asarray(Image.open(layout.path).convert("RGB"))
    assert (picture.shape[1], picture.shape[0]) == layout.size and layout.size[0] >= 9 * layout.cell[0]
    cell_w, cell_h = layout.cell
    for row, clip in enumerate((without, with_lora)):
        for column in (0, 8):
            x, y = layout.origins[row][column]
            expected = (np.clip(clip[column], 0, 1) * 255).round().astype(np.uint8)
            enlarged = expected.repeat(layout.scale, axis=0).repeat(layout.scale, axis=1)
            assert np.array_equal(picture[y : y + cell_h, x : x + cell_w], enlarged), (row, column)
    # Cells neither overlap nor leave the picture.
    corners = [origin for row in layout.origins for origin in row]
    assert len(set(corners)) == 27 and max(x for x, _ in corners) + cell_w <= layout.size[0]
    assert layout.origins[2][0][1] >= layout.origins[1][0][1] + cell_h and \
        layout.origins[2][0][1] + cell_h <= layout.size[1]
