"""Component loading: one at a time, dtype and device honoured, released on demand, clear errors."""

from __future__ import annotations

import functools
import json
import shutil
import weakref

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from transformers import T5EncoderModel

from cogvx_dist.core.loading import (
    ComponentStore,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)
from tests.helpers import assert_one_line_error, cli


def test_each_component_loads_alone_with_its_dtype(tiny_checkpoint):
    source = tiny_checkpoint("CogVideoX-2b")
    tokenizer = load_tokenizer(source)
    ids = tokenizer("a red square moves left", padding="max_length", max_length=226, truncation=True).input_ids
    assert len(ids) == 226 and ids[-1] == tokenizer.pad_token_id
    text_encoder = load_text_encoder(source, dtype=torch.bfloat16)
    assert isinstance(text_encoder, T5EncoderModel) and text_encoder.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in text_encoder.parameters())
    transformer = load_transformer(source, dtype=torch.bfloat16, device="cpu")
    assert isinstance(transformer, CogVideoXTransformer3DModel) and transformer.dtype == torch.bfloat16
    vae = load_vae(source, dtype=torch.float32)
    assert isinstance(vae, AutoencoderKLCogVideoX) and not any(p.requires_grad for p in vae.parameters())
    assert isinstance(load_scheduler(source), CogVideoXDPMScheduler)


def test_loading_the_transformer_builds_no_encoder(tiny_checkpoint, monkeypatch):
    source = tiny_checkpoint("CogVideoX-2b")
    built: list[str] = []
    for cls in (T5EncoderModel, AutoencoderKLCogVideoX):
        original = cls.__init__

        @functools.wraps(original)
        def recording_init(self, *args, __original=original, **kwargs):
            built.append(type(self).__name__)
            __original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    assert isinstance(load_transformer(source), CogVideoXTransformer3DModel)
    assert built == []
    load_vae(source)
    assert built == ["AutoencoderKLCogVideoX"]


def test_component_store_releases_an_encoder_once_unloaded(tiny_checkpoint):
    store = ComponentStore(tiny_checkpoint("CogVideoX-2b"))
    encoder_ref = weakref.ref(store.get("text_encoder"))
    vae_ref = weakref.ref(store.get("vae"))
    store.get("tokenizer")
    assert store.loaded() == ["tokenizer", "text_encoder", "vae"]
    store.unload("text_encoder")
    assert encoder_ref() is None, "text encoder still referenced after unload"
    assert vae_ref() is not None and store.loaded() == ["tokenizer", "vae"]
    store.unload("vae", "tokenizer")
    assert vae_ref() is None and store.loaded() == []


def test_missing_subfolder_is_one_line(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("CogVideoX-2b"), broken)
    shutil.rmtree(broken / "transformer")
    assert_one_line_error(*cli(capsys, "info", str(broken))[::2], "transformer/ subfolder")


def test_non_cogvideox_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_one_line_error(*cli(capsys, "info", str(tmp_path))[::2], "not a CogVideoX checkpoint",
                          "StableDiffusionPipeline")
    assert_one_line_error(*cli(capsys, "info", str(tmp_path / "nowhere"))[::2], "does not exist")


def test_unknown_family_config_is_one_line(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("CogVideoX-2b"), broken)
    config_path = broken / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["patch_size_t"] = 3
    config_path.write_text(json.dumps(config))
    assert_one_line_error(*cli(capsys, "info", str(broken))[::2], "no known CogVideoX family", "patch_size_t=3")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe{}", "not a text file"),
])
def test_a_component_config_that_is_not_a_json_object_is_one_line(tiny_checkpoint, tmp_path, capsys, content,
                                                                   fragment):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("CogVideoX-2b"), broken)
    (broken / "transformer" / "config.json").write_bytes(content)
    assert_one_line_error(*cli(capsys, "info", str(broken))[::2], "transformer/config.json", fragment)


def test_one_line_errors_keep_their_cause_for_cogvx_debug(tmp_path, capsys, monkeypatch):
    (tmp_path / "model_index.json").write_text("{not json")
    code, _, err = cli(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, "model_index.json: not valid JSON")
    monkeypatch.setenv("COGVX_DEBUG", "1")
    code, _, err = cli(capsys, "info", str(tmp_path))
    assert code == 2 and err.splitlines()[0].startswith("cogvx info: error:")
    assert "JSONDecodeError" in err and "direct cause of the following exception" in err and "Traceback" in err
