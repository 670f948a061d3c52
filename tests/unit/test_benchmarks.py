"""The benchmark scripts: the tiny prep benchmark reports every field, bad flags are one line, and the full-size
training checkpoint is one the trainer takes (numbers are not judged: no wall-clock limits). The slow runs are in
tests/e2e/test_benchmark_runs.py."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

BENCH = REPO / "benchmarks" / "bench_prep.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900)


def test_tiny_benchmark_reports_the_stage_split(tmp_path):
    run = run_bench("--count", "3", "--json", str(tmp_path / "report.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["videos"] == 3 and report["videos_per_s"] > 0
    assert set(report["s_per_video"]) >= {"decode", "decode_wait", "t5", "vae", "write"}
    assert report["source"].endswith("-> 9x32x48")


def test_unknown_variant_is_one_line():
    run = run_bench("--full-size", "--device", "cpu", "--variants", "eager,turbo")
    assert run.returncode != 0 and "unknown variant part 'turbo'" in run.stderr
    assert "Traceback" not in run.stderr


TRAIN_BENCH = BENCH.parent / "bench_train.py"


def test_full_size_train_checkpoint_passes_the_trainer_preflight(tmp_path):
    """The GPU benchmark's checkpoint (released config, random weights; one block here) is one the trainer takes."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_train import write_train_checkpoint

    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.preflight import preflight

    model = write_train_checkpoint(tmp_path / "model", "CogVideoX-2b", "cpu", num_layers=1)
    info = describe_checkpoint(model)
    assert info.family.name == "CogVideoX-2b" and (info.frames, info.height, info.width) == (49, 480, 720)
    assert info.transformer_config["num_attention_heads"] == 30 and info.transformer_config["num_layers"] == 1
    write_synthetic_shards(tmp_path / "shards", model, [1])
    checks = preflight(load_config(RunConfig, None, [f"model.path={model}", f"data.shards={tmp_path / 'shards'}"]))
    assert checks.manifest.latent_frames == 13 and checks.manifest.sizes() == [(480, 720)]


BENCHMARKS_DOC = REPO / "docs" / "BENCHMARKS.md"
REFERENCE_CASES = {
    ("CogVideoX-2b", 1, "none"): "2b, gradient checkpointing",
    ("CogVideoX-2b", 0, "none"): "2b, no checkpointing",
    ("CogVideoX-2b", 1, "zero2"): "2b, checkpointing, DeepSpeed ZeRO-2 single rank",
    ("CogVideoX-5b", 1, "none"): "5b, gradient checkpointing",
    ("CogVideoX-5b", 0, "none"): "5b, no checkpointing",
}
"""H200_MEASURED_PEAKS_GIB's keys -> the rows of docs/BENCHMARKS.md's H200 reference table."""


def documented_reference() -> dict[str, tuple[float, float]]:
    """docs/BENCHMARKS.md's H200 reference table: case -> (s/step, peak GiB)."""
    rows = {}
    for line in BENCHMARKS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0][:3] in ("2b,", "5b,"):
            rows[cells[0]] = (float(cells[1]), float(cells[2]))
    return rows


def test_reference_figures_in_the_code_are_the_documented_ones():
    """The planner's H200 peaks and bench_train's reference are the figures docs/BENCHMARKS.md records."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_prep import TARGET_S_PER_VIDEO
    from bench_train import REFERENCE

    from cogvx_dist.train.memory.plan import H200_MEASURED_PEAKS_GIB

    table = documented_reference()
    assert set(table) == set(REFERENCE_CASES.values())
    assert {(f, c, z) for f, c, z, _ in H200_MEASURED_PEAKS_GIB} == set(REFERENCE_CASES)
    for family, checkpointing, zero, gib in H200_MEASURED_PEAKS_GIB:
        assert table[REFERENCE_CASES[family, checkpointing, zero]][1] == gib, family
    for family, zero in (("CogVideoX-2b", "zero2"), ("CogVideoX-5b", "none")):
        reference = REFERENCE[family]
        assert (reference["s_per_step"], reference["peak_gib"]) == table[REFERENCE_CASES[family, 1, zero]], family
    assert f"at most {TARGET_S_PER_VIDEO:g} s/clip" in BENCHMARKS_DOC.read_text()


def test_the_kept_data_report_is_the_documented_one():
    report = json.loads((BENCH.parent / "results" / "bench_data-1M-2cpu.json").read_text())
    text = BENCHMARKS_DOC.read_text()
    for rate in (report["ranged_samples_per_s"], report["webdataset_samples_per_s"],
                 report["s3"]["ranged_samples_per_s"], report["s3"]["webdataset_samples_per_s"]):
        assert f"{int(rate + 0.5):,} samples/s" in text, rate  # rounded half up, as written


def test_nothing_refers_to_files_outside_the_repository():
    """Docs, code, tests and scripts cite what the repository holds (measured figures: docs/BENCHMARKS.md)."""
    outside = ("../" + "shared/", "ENVIRONMENT" + ".md")
    tracked = [REPO / name for name in ("README.md", "Makefile", "Dockerfile", "pyproject.toml")]
    for folder in ("benchmarks", "cogvx_dist", "data_prep", "docs", "ds_configs", "launchers", "tests", ".ci"):
        tracked += [p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    and p.suffix not in (".gz", ".pyc")]
    found = [f"{path.relative_to(REPO)}: {text}" for path in tracked for text in outside
             if text in path.read_text(errors="replace")]
    assert not found, found


def test_the_kept_digest_cost_report_is_the_documented_one_and_under_one_percent_of_a_step():
    """The claim `data.verify: sha256` is the default on: its digest costs under 1% of an H200 step."""
    report = json.loads((BENCH.parent / "results" / "bench_verify-2cpu.json").read_text())
    text = BENCHMARKS_DOC.read_text()
    measured = [case for case in report["cases"] if "share_of_step_percent" in case]
    assert measured and all(case["share_of_step_percent"] < 1.0 for case in measured), measured
    for case in report["cases"]:
        assert f"| {case['sample_mb']:.2f} MB | {case['digest_ms']:.2f} ms |" in text, case
