"""`cogvx export RUN --format comfyui`: the adapter as core ComfyUI's LoRA loaders read it.

ComfyUI's own code runs in `test_comfyui_applies_the_adapter_as_diffusers_does`: ComfyUI is not on PyPI (its core
is a git checkout with its own requirements, a CUDA torch and torchvision among them), so that test needs a
checkout and a Python that has its requirements, named by two variables, and is skipped without them:

    COGVX_COMFYUI=/path/to/ComfyUI COGVX_COMFYUI_PYTHON=/path/to/its/venv/bin/python \\
        .venv/bin/pytest -q tests/unit/test_comfyui.py

It runs `comfyui_driver.py` in that Python: ComfyUI detects and builds its CogVideoX model from a tiny checkpoint's
weights, loads the exported file with `comfy.sd.load_lora_for_models` and patches the weights; the test compares
every weight, and for CogVideoX 1.5 the transformer's output, with diffusers loading the diffusers file. The other
tests check the file and the command without ComfyUI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import (
    COMFYUI_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    LoraSettings,
    comfyui_state_dict,
    comfyui_weight_name,
    export_lora,
    inject_lora,
    lora_state_dict,
)
from tests.helpers import assert_one_line_error, cli, write_checkpoint

SETTINGS = LoraSettings(rank=4, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                            "ff.net.2", "norm1.linear"])
"""alpha / r = 2, so a file whose alpha ComfyUI did not read would apply B·A at half the trained scale."""
DRIVER = Path(__file__).with_name("comfyui_driver.py")
COMFYUI_DIR = os.environ.get("COGVX_COMFYUI", "")
COMFYUI_PYTHON = os.environ.get("COGVX_COMFYUI_PYTHON", "")


def trained_run(model: Path, run: Path, family: str) -> Path:
    """A run folder whose final adapter (every layer SETTINGS adapts, B non-zero as after training) is exported as
    the trainer exports it."""
    transformer = inject_lora(load_transformer(model), SETTINGS, seed=1)
    generator = torch.Generator().manual_seed(2)
    state = {name: torch.randn(t.shape, generator=generator) * 0.3 if ".lora_B." in name else t.clone()
             for name, t in lora_state_dict(transformer).items()}
    (run / "run_config.json").parent.mkdir(parents=True, exist_ok=True)
    (run / "run_config.json").write_text("{}\n")
    export_lora(state, SETTINGS, run / "lora", family)
    return run


def test_the_comfyui_file_names_comfyuis_modules_and_carries_alpha(tiny_checkpoint, tmp_path, capsys):
    run = trained_run(tiny_checkpoint("CogVideoX-2b"), tmp_path / "run", "CogVideoX-2b")
    code, out, err = cli(capsys, "export", str(run), "--format", "comfyui")
    assert code == 0, err
    written = run / "lora" / COMFYUI_WEIGHTS_NAME
    assert str(written) in out and "LoraLoaderModelOnly" in out

    comfy = load_file(written)
    diffusers = load_file(run / "lora" / LORA_WEIGHTS_NAME)
    # ComfyUI's CogVideoX (comfy/ldm/cogvideo/model.py) names the block's layers q, k, v, attn_out, ff_proj, ff_out
    for ours, theirs in (("transformer_blocks.1.attn1.to_q", "blocks.1.q"),
                         ("transformer_blocks.1.attn1.to_out.0", "blocks.1.attn_out"),
                         ("transformer_blocks.0.ff.net.0.proj", "blocks.0.ff_proj"),
                         ("transformer_blocks.0.ff.net.2", "blocks.0.ff_out"),
                         ("transformer_blocks.0.norm1.linear", "blocks.0.norm1.linear")):
        for matrix in ("lora_A", "lora_B"):
            assert torch.equal(comfy[f"diffusion_model.{theirs}.{matrix}.weight"],
                               diffusers[f"transformer.{ours}.{matrix}.weight"])
        alpha = comfy[f"diffusion_model.{theirs}.alpha"]
        assert alpha.shape == () and alpha.item() == SETTINGS.alpha
    layers = {name.rsplit(".lora_", 1)[0] for name in diffusers}
    assert len(comfy) == 3 * len(layers) == 3 * 2 * 7
    assert all(name.startswith("diffusion_model.blocks.") for name in comfy)
    with safe_open(str(written), framework="pt") as handle:
        header = handle.metadata()
    assert header["cogvx_family"] == "CogVideoX-2b" and header["lora_alpha"] == "8" and header["lora_rank"] == "4"

    first = written.read_bytes()
    code, _, err = cli(capsys, "export", str(run / "lora"), "--format", "comfyui", "--out", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / COMFYUI_WEIGHTS_NAME).read_bytes() == first, "the same adapter gives the same bytes"


def test_the_default_format_is_the_diffusers_file_the_run_wrote(tiny_checkpoint, tmp_path, capsys):
    run = trained_run(tiny_checkpoint("CogVideoX-2b"), tmp_path / "run", "CogVideoX-2b")
    code, out, err = cli(capsys, "export", str(run))
    assert code == 0, err
    assert str(run / "lora" / LORA_WEIGHTS_NAME) in out and not (run / "lora" / COMFYUI_WEIGHTS_NAME).exists()
    code, _, err = cli(capsys, "export", str(run), "--out", str(tmp_path / "copy"))
    assert code == 0, err
    assert (tmp_path / "copy" / LORA_WEIGHTS_NAME).read_bytes() == (run / "lora" / LORA_WEIGHTS_NAME).read_bytes()


def test_export_picks_a_checkpoint_or_says_which_exist(tiny_checkpoint, tmp_path, capsys):
    model, run = tiny_checkpoint("CogVideoX-2b"), tmp_path / "run"
    write_checkpoint(run, model, step=2, seed=5)
    write_checkpoint(run, model, step=4, seed=6)
    code, _, err = cli(capsys, "export", str(run), "--format", "comfyui")
    assert_one_line_error(code, err, "no final adapter", "--step (2, 4)")
    code, _, err = cli(capsys, "export", str(run), "--format", "comfyui", "--step", "3")
    assert_one_line_error(code, err, "no committed checkpoint at step 3", "committed: 2, 4")
    code, _, err = cli(capsys, "export", str(run), "--ema")
    assert_one_line_error(code, err, "no moving average")
    code, _, err = cli(capsys, "export", str(tmp_path / "nowhere"), "--format", "comfyui")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = cli(capsys, "export", str(run / "checkpoints" / "step-00000004" / "lora"), "--step", "4")
    assert_one_line_error(code, err, "is an adapter, not a run folder")

    code, out, err = cli(capsys, "export", str(run), "--format", "comfyui", "--step", "4", "--out",
                         str(tmp_path / "step4.safetensors"))
    assert code == 0, err
    step4 = load_file(tmp_path / "step4.safetensors")
    source = load_file(run / "checkpoints" / "step-00000004" / "lora" / LORA_WEIGHTS_NAME)
    assert torch.equal(step4["diffusion_model.blocks.0.k.lora_B.weight"],
                       source["transformer.transformer_blocks.0.attn1.to_k.lora_B.weight"])


def test_a_layer_comfyui_has_no_name_for_is_refused():
    state = {"transformer_blocks.0.attn2.to_q.lora_A.weight": torch.zeros(4, 8),
             "transformer_blocks.0.attn2.to_q.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(CogvxError, match="transformer_blocks.0.attn2.to_q"):
        comfyui_state_dict(state, SETTINGS)


def diffusers_reference(model: Path, lora: Path, strength: float, inputs: dict[str, torch.Tensor],
                        rotary: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What diffusers makes of the exported diffusers file at `strength`: the fused transformer's weights under
    ComfyUI's names, and its output for `inputs` (ComfyUI's [B, C, T, H, W] layout)."""
    from diffusers import CogVideoXPipeline

    from cogvx_dist.train.step.loss import rotary_embeddings

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    transformer = pipe.transformer
    hidden = inputs["x"].permute(0, 2, 1, 3, 4)
    extra = {"ofs": inputs["ofs"]} if "ofs" in inputs else {}
    if rotary:
        frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]
        extra["image_rotary_emb"] = rotary_embeddings(dict(transformer.config), frames, height, width,
                                                      torch.device("cpu"))
    with torch.no_grad():
        out = transformer(hidden_states=hidden, encoder_hidden_states=inputs["context"],
                          timestep=inputs["timestep"].to(torch.int64), **extra).sample
    return {comfyui_weight_name(k): v.float() for k, v in transformer.state_dict().items()}, out.permute(0, 2, 1, 3, 4)


@pytest.mark.skipif(not (COMFYUI_DIR and COMFYUI_PYTHON),
                    reason="needs COGVX_COMFYUI (a ComfyUI checkout) and COGVX_COMFYUI_PYTHON (a Python with its "
                           "requirements); ComfyUI is not on PyPI")
@pytest.mark.parametrize("family, strength, same_output",
                         [("CogVideoX-2b", 1.0, False), ("CogVideoX1.5-5b-I2V", 0.75, True)])
def test_comfyui_applies_the_adapter_as_diffusers_does(tiny_checkpoint, tmp_path, capsys, family, strength,
                                                       same_output):
    """`same_output`: ComfyUI's CogVideoX computes what diffusers does for this family, so the adapted outputs
    must agree too (for 2b its sin-cos position embedding splits the channels otherwise; weights still must)."""
    model = tiny_checkpoint(family)
    run = trained_run(model, tmp_path / "run", family)
    assert cli(capsys, "export", str(run), "--format", "comfyui")[0] == 0
    base = load_transformer(model)
    config = dict(base.config)
    base_weights = {comfyui_weight_name(k): v.float().contiguous() for k, v in base.state_dict().items()}
    assert None not in base_weights, "every weight of the transformer has a ComfyUI name"
    save_file(base_weights, tmp_path / "base.safetensors")
    generator = torch.Generator().manual_seed(0)
    frames = 3 if config["patch_size_t"] is None else 4
    inputs = {"x": torch.randn(1, config["in_channels"], frames, 4, 6, generator=generator),
              "timestep": torch.tensor([400.0]),
              "context": torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"], generator=generator)}
    if config["ofs_embed_dim"]:
        inputs["ofs"] = torch.tensor([2.0])
    save_file(inputs, tmp_path / "inputs.safetensors")
    job = {"base": str(tmp_path / "base.safetensors"), "config": config, "strength": strength,
           "lora": str(run / "lora" / COMFYUI_WEIGHTS_NAME), "inputs": str(tmp_path / "inputs.safetensors"),
           "out": str(tmp_path / "comfyui.safetensors"), "report": str(tmp_path / "report.json")}
    (tmp_path / "job.json").write_text(json.dumps(job, default=str))
    done = subprocess.run([COMFYUI_PYTHON, str(DRIVER), COMFYUI_DIR, str(tmp_path / "job.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((tmp_path / "report.json").read_text())
    assert not [m for m in report["warnings"] if "not loaded" in m.lower()], report["warnings"]
    file_layers = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in report["lora_keys"]}
    assert report["patched_weights"] == sorted(f"{layer}.weight" for layer in file_layers)
    assert len(report["patched_weights"]) == 2 * 7
    comfyui = load_file(tmp_path / "comfyui.safetensors")
    expected, output = diffusers_reference(model, run / "lora", strength, inputs,
                                           config["use_rotary_positional_embeddings"])
    assert {k.removeprefix("weight/") for k in comfyui if k.startswith("weight/")} == set(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(comfyui[f"weight/{name}"], weight, rtol=0, atol=1e-6, msg=name)
    changed = [name for name in expected if not torch.equal(expected[name], base_weights[name])]
    assert sorted(f"diffusion_model.{name}" for name in changed) == report["patched_weights"]
    if same_output:
        torch.testing.assert_close(comfyui["out/adapted"], output, rtol=1e-5, atol=1e-5)
        assert (comfyui["out/adapted"] - comfyui["out/plain"]).abs().max() > 0.1, "the adapter changes the output"
