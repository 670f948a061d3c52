"""The exported adapter's model card: a header the Hub's own parser reads, a body that says what was trained, and a
loading snippet that really loads the adapter the trainer exported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import LoraSettings, inject_lora, lora_parameters, lora_state_dict
from cogvx_dist.core.model_card import (
    ADAPTER_NAME,
    CardFacts,
    ValidationClip,
    model_card,
    write_model_card,
)
from cogvx_dist.core.run_folder import MODEL_CARD, RunFolder
from cogvx_dist.train.checkpointer import Checkpointer
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.ds_config import load_ds_config
from tests.helpers import transformer_output

LORA = LoraSettings(rank=4, alpha=2.0, target_modules=["to_q", "to_v"])


def _facts(**changes) -> CardFacts:
    facts = {"base_model": "THUDM/CogVideoX-2b", "family": "CogVideoX-2b", "lora": LORA, "steps": 300,
             "samples_seen": 2400, "adapter_folder": "/runs/corgi/lora"}
    return CardFacts(**{**facts, **changes})


def _code(card_text: str) -> str:
    """The card's first Python block."""
    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


def _load_lines(code: str) -> str:
    """The snippet up to its move to the GPU: loading the pipeline and the adapter, and setting its weight."""
    return code.split('pipe.to("cuda")')[0]


def test_the_hub_parses_the_header_and_the_body_says_what_was_trained(tmp_path):
    path = write_model_card(tmp_path, _facts(prompt_templates=["<sks> {prompt}"], training={"seed": "7"}))
    assert path == tmp_path / MODEL_CARD
    card = ModelCard.load(path)
    header = card.data.to_dict()
    assert header["base_model"] == "THUDM/CogVideoX-2b" and header["library_name"] == "diffusers"
    assert header["pipeline_tag"] == "text-to-video" and header["license"] == "apache-2.0"
    assert {"lora", "text-to-video", "cogvideox", "diffusers", "template:diffusion-lora"} <= set(header["tags"])
    assert header["instance_prompt"] == "<sks>"
    body = card.text
    for row in ("| model family | CogVideoX-2b |", "| LoRA rank / alpha | 4 / 2 (scale alpha / rank = 0.5) |",
                "| target modules | `to_q`, `to_v` |", "| steps trained | 300 |", "| samples seen | 2,400 |",
                "| seed | 7 |"):
        assert row in body, row
    assert "trigger words `<sks>`" in body and "`<sks> {prompt}`" in body
    code = _code(body)
    assert 'CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-2b"' in code
    assert f'load_lora_weights("/runs/corgi/lora", adapter_name="{ADAPTER_NAME}")' in code
    assert f'set_adapters(["{ADAPTER_NAME}"], [1.0])' in code and 'prompt = "<sks> a corgi' in code
    compile(code, "snippet", "exec")  # the whole snippet is valid Python
    assert "No validation clips" in body and "Before pushing" not in body  # a hub base needs no edit


def test_what_the_card_says_when_it_knows_less_or_more():
    local = model_card(_facts(base_model="/models/cogvx-5b", family="CogVideoX-5b", prompt_templates=None))
    header = ModelCard(local).data.to_dict()
    assert header["base_model"] == "/models/cogvx-5b" and "license" not in header  # not an official base: unknown
    assert "set `base_model`" in local and "`THUDM/CogVideoX-5b`" in local
    assert "could not be read" in local and "instance_prompt" not in header

    plain = model_card(_facts(validation=ValidationClip(step=200, prompt="a red square", mp4="../v/s/00.mp4",
                                                        grid="../v/s/00_grid.png"), average_folder="../lora_ema/"))
    assert "Trigger words: none" in plain and "instance_prompt" not in ModelCard(plain).data.to_dict()
    assert "step 200" in plain and "(../v/s/00.mp4)" in plain and "![" in plain and "(../v/s/00_grid.png)" in plain
    assert 'prompt = "a red square"' in _code(plain)  # the snippet samples a prompt it was validated with
    assert "`../lora_ema/`" in plain

    i2v = model_card(_facts(base_model="THUDM/CogVideoX-5b-I2V", family="CogVideoX-5b-I2V", image_to_video=True,
                            pipeline_class="CogVideoXImageToVideoPipeline", fps=8))
    header = ModelCard(i2v).data.to_dict()
    assert header["pipeline_tag"] == "image-to-video" and header["license"] == "other"
    assert header["license_link"] == "https://huggingface.co/THUDM/CogVideoX-5b-I2V/blob/main/LICENSE"
    code = _code(i2v)
    assert "CogVideoXImageToVideoPipeline.from_pretrained" in code and "pipe(image=image, prompt=prompt" in code
    compile(code, "snippet", "exec")


@pytest.fixture
def exported_run(tiny_checkpoint, tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """(run folder, base model, trained transformer) after Checkpointer.export_final on one rank: a trained-looking
    adapter (non-zero B), a dataset whose captions carry a trigger word, and one validated checkpoint."""
    model = tiny_checkpoint("CogVideoX-2b")
    trained = inject_lora(load_transformer(model), LORA, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in sorted(lora_parameters(trained).items()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"prompt_template": "<sks> {prompt}"}))
    run = RunFolder(tmp_path / "run")
    step = run.validation / "step-00000008"
    step.mkdir(parents=True)
    for name in ("00_a_red_square.mp4", "00_a_red_square_grid.png"):
        (step / name).write_bytes(b"x")
    run.validation_record.write_text(json.dumps({"steps": {"4": {"folder": "step-00000004", "clips": []}, "8": {
        "folder": step.name, "clips": [{"prompt": "<sks> a red square", "mp4": "00_a_red_square.mp4",
                                        "grid": "00_a_red_square_grid.png"}]}}}))
    config = RunConfig(output_dir=str(run.root))
    config.model.path, config.model.dtype, config.data.shards, config.lora = str(model), "float32", str(shards), LORA
    config.train.max_steps = 8
    checkpointer = Checkpointer(config, load_ds_config("zero2"), RankInfo(rank=0, world_size=1, local_rank=0), None,
                                [], None, "CogVideoX-2b")
    summary = {"steps": 8, "samples_seen": 32, "world_size": 1, "zero_stage": 2, "family": "CogVideoX-2b"}
    checkpointer.export_final(lora_state_dict(trained), summary)
    return run.root, model, trained


def test_export_final_writes_a_card_whose_snippet_loads_the_adapter(exported_run):
    root, model, trained = exported_run
    run = RunFolder(root)
    card = ModelCard.load(run.lora / MODEL_CARD)
    assert card.data.to_dict()["base_model"] == str(model)
    assert "| steps trained | 8 |" in card.text and "| samples seen | 32 |" in card.text
    assert "| batch | 1 per rank x 1 accumulation x 1 ranks (ZeRO-2) |" in card.text
    assert card.data.to_dict()["instance_prompt"] == "<sks>"  # read from the dataset's manifest
    # The newest validated step's clip, linked relative to the adapter folder, where it really is.
    links = re.findall(r"\]\((\.\./validation/[^)]+)\)", card.text)
    assert len(links) == 2 and all((run.lora / link).resolve().is_file() for link in links)
    assert "step 8" in card.text

    # Run the snippet's loading lines as a user would: the adapter loads, at its trained scale, and computes what
    # the trained transformer computed.
    namespace: dict = {}
    exec(_load_lines(_code(card.text)), namespace)  # the snippet is ours, written a moment ago
    pipe = namespace["pipe"]
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert layer.scaling[ADAPTER_NAME] == pytest.approx(LORA.alpha / LORA.rank)
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(trained), rtol=1e-5,
                               atol=1e-5)
