"""LoRA: the math of one layer, what trains, and export/import through diffusers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import CogVideoXPipeline

from cogvx_dist.core.loading import load_transformer
from cogvx_dist.core.lora import (
    LORA_WEIGHTS_NAME,
    LoraSettings,
    adapter_checksum,
    export_lora,
    inject_lora,
    load_exported_lora,
    lora_parameters,
    lora_state_dict,
)
from tests.helpers import transformer_output


def _randomise_b(transformer: torch.nn.Module, seed: int) -> None:
    """Give B non-zero values, as after training, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(lora_parameters(transformer).items()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_lora_linear_computes_wx_plus_scaled_bax(tiny_checkpoint):
    transformer = load_transformer(tiny_checkpoint("CogVideoX-2b"))
    settings = LoraSettings(rank=4, alpha=8.0)
    inject_lora(transformer, settings, seed=1)
    _randomise_b(transformer, seed=2)
    layer = transformer.transformer_blocks[1].attn1.to_v
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, W.shape[1]) and B.shape == (W.shape[0], 4)
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x @ W.T + b + (8.0 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    without_adapter = x @ W.T + b
    assert not torch.allclose(layer(x), without_adapter, atol=1e-4)


def test_only_adapter_weights_train(tiny_checkpoint):
    transformer = load_transformer(tiny_checkpoint("CogVideoX-2b"))
    inject_lora(transformer, LoraSettings(), seed=0)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(transformer))
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    assert len(trainable) == 2 * 4 * len(transformer.transformer_blocks)


@pytest.mark.parametrize("rank, alpha", [(128, 64.0), (16, 16.0)])
def test_exported_adapter_reloads_in_diffusers_at_trained_scale(tiny_checkpoint, tmp_path, rank, alpha):
    source = tiny_checkpoint("CogVideoX-2b")
    settings = LoraSettings(rank=rank, alpha=alpha)
    trained = inject_lora(load_transformer(source), settings, seed=3)
    _randomise_b(trained, seed=4)
    weights = export_lora(lora_state_dict(trained), settings, tmp_path)
    assert weights.name == LORA_WEIGHTS_NAME

    pipe = CogVideoXPipeline.from_pretrained(str(source))
    pipe.load_lora_weights(str(tmp_path))
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.scaling["default_0"] == pytest.approx(alpha / rank)

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, 16, 4, 6, generator=generator)
    text = torch.randn(1, 226, 32, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        expected = trained(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep).sample
        loaded = pipe.transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep).sample
        base = load_transformer(source)(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep).sample
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3, "the adapter should change the output"

    exported = load_exported_lora(tmp_path)
    state, read_settings = exported.state, exported.settings
    assert (read_settings.rank, read_settings.alpha) == (rank, alpha)
    assert adapter_checksum(state) == adapter_checksum(lora_state_dict(trained))


EXPORT_SCRIPT = """
import sys, torch
from cogvx_dist.core.lora import LoraSettings, export_lora
generator = torch.Generator().manual_seed(0)
state = {f"transformer_blocks.0.attn1.{m}.lora_{ab}.weight": torch.randn(4, 4, generator=generator)
         for m in ("to_q", "to_k", "to_v", "to_out.0") for ab in "AB"}
export_lora(state, LoraSettings(rank=4, alpha=4.0), sys.argv[1], "CogVideoX-2b")
"""


def test_the_exported_adapter_is_byte_identical_across_processes(tmp_path):
    """The same tensors give the same file whatever the hash seed (PEFT keeps target_modules as a set)."""
    import hashlib
    import os

    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(out)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(hashlib.sha256((out / LORA_WEIGHTS_NAME).read_bytes()).hexdigest())
    assert len(digests) == 1


def _trained_state(model, settings: LoraSettings, seed: int) -> dict[str, torch.Tensor]:
    transformer = inject_lora(load_transformer(model), settings, seed=seed)
    _randomise_b(transformer, seed=seed + 1)
    return {name: tensor.clone() for name, tensor in lora_state_dict(transformer).items()}


def _started_from(model, lora: LoraSettings) -> torch.nn.Module:
    from cogvx_dist.train.step.model import build_model

    return build_model(str(model), "float32", lora, seed=0, checkpoint_every=0, initial=lora.initial_adapter())


def test_init_from_starts_from_adapters_that_diffusers_and_peft_wrote(tiny_checkpoint, tmp_path):
    """lora.init_from: the adapter of step 0 equals the file's exactly, whichever tool wrote it; a file without
    lora_alpha needs lora.init_alpha; a different lora.alpha rescales B so that the model computes the same."""
    from peft import get_peft_model

    from cogvx_dist.core.errors import CogvxError

    model = tiny_checkpoint("CogVideoX-2b")
    settings = LoraSettings(rank=4, alpha=2.0)
    state = _trained_state(model, settings, seed=7)
    CogVideoXPipeline.save_lora_weights(str(tmp_path / "diffusers"), transformer_lora_layers=state,
                                        transformer_lora_adapter_metadata=settings.peft_config().to_dict())
    CogVideoXPipeline.save_lora_weights(str(tmp_path / "official"), transformer_lora_layers=state)  # no alpha
    peft_model = get_peft_model(load_transformer(model), settings.peft_config())
    loaded = peft_model.load_state_dict({f"base_model.model.{k.replace('.weight', '.default.weight')}": v
                                         for k, v in state.items()}, strict=False)
    assert not loaded.unexpected_keys
    peft_model.save_pretrained(str(tmp_path / "peft"))
    export_lora(state, settings, tmp_path / "cogvx", "CogVideoX-2b")

    for folder, init_alpha in [("diffusers", 0.0), ("official", 2.0), ("peft", 0.0), ("cogvx", 0.0)]:
        lora = LoraSettings(rank=4, alpha=2.0, init_from=str(tmp_path / folder), init_alpha=init_alpha)
        started = lora_state_dict(_started_from(model, lora))
        assert started.keys() == state.keys(), folder
        assert all(torch.equal(started[name], state[name]) for name in state), folder

    with pytest.raises(CogvxError, match="records no lora_alpha.*give it as lora.init_alpha"):
        LoraSettings(rank=4, alpha=2.0, init_from=str(tmp_path / "official")).initial_adapter()
    with pytest.raises(CogvxError, match="records lora_alpha 2, not the 3 given"):
        LoraSettings(rank=4, alpha=2.0, init_from=str(tmp_path / "diffusers"), init_alpha=3.0).initial_adapter()
    with pytest.raises(CogvxError, match="has rank 4, but lora.rank is 8; set lora.rank: 4"):
        LoraSettings(rank=8, alpha=2.0, init_from=str(tmp_path / "diffusers")).initial_adapter()
    with pytest.raises(CogvxError, match="has no .*to_k.lora_A.weight, which lora.target_modules adapts; set "
                                         r"lora.target_modules to the adapter's: \[to_out.0, to_q\]"):
        narrow = {k: v for k, v in state.items() if ".to_q." in k or ".to_out.0." in k}
        CogVideoXPipeline.save_lora_weights(str(tmp_path / "narrow"), transformer_lora_layers=narrow)
        _started_from(model, LoraSettings(rank=4, alpha=2.0, init_from=str(tmp_path / "narrow"), init_alpha=2.0))

    # Continued at another alpha: B is rescaled, the adapted transformer computes what the file's adapter did.
    same = _started_from(model, LoraSettings(rank=4, alpha=2.0, init_from=str(tmp_path / "diffusers")))
    louder = _started_from(model, LoraSettings(rank=4, alpha=8.0, init_from=str(tmp_path / "diffusers")))
    torch.testing.assert_close(transformer_output(louder), transformer_output(same), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transformer_output(same), transformer_output(load_transformer(model)), atol=1e-4)
