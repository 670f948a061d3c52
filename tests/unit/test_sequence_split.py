"""The pieces of sequence parallelism that need no second process: how tokens and heads are shared, the warning
about uneven heads, and the token layout the loss compares against (the inverse of the model's unpatchify)."""

from __future__ import annotations

import pytest
import torch

from cogvx_dist.train.step.sequence_parallel import SequenceSplit, even_split, head_imbalance, video_tokens


@pytest.mark.parametrize("total, parts, expected", [(226, 4, (57, 57, 56, 56)), (30, 4, (8, 8, 7, 7)),
                                                     (18, 2, (9, 9)), (1, 2, (1, 0))])
def test_shares_are_contiguous_near_equal_and_cover_everything(total, parts, expected):
    assert even_split(total, parts) == expected
    split = [SequenceSplit.of(total, total, 30, parts, index) for index in range(parts)]
    rows = [i for s in split for i in range(total)[s.local_text()]]
    assert rows == list(range(total))  # every token on exactly one rank, in order


def test_uneven_heads_are_named_and_even_ones_pass():
    assert head_imbalance(48, 8) is None
    warning = head_imbalance(30, 4)
    assert "parallel.sequence_parallel 4 does not divide the model's 30 attention heads" in warning
    assert "8 or 7 heads, so attention takes 1.07x as long as an even share would" in warning


@pytest.mark.parametrize("family", ["CogVideoX-2b", "CogVideoX1.5-5b-I2V"])
def test_video_tokens_invert_the_transformers_unpatchify(tiny_checkpoint, family):
    """Token i of what proj_out emits, unpatchified by the model's own forward, lands where token i of video_tokens
    of the output comes from (with and without temporal patches)."""
    from cogvx_dist.core.loading import load_transformer

    transformer = load_transformer(tiny_checkpoint(family))
    config = transformer.config
    captured = []
    transformer.proj_out.register_forward_hook(lambda module, args, out: captured.append(out))
    frames = 2 * (config.patch_size_t or 1)
    video = torch.randn(1, frames, config.in_channels, config.sample_height, config.sample_width)
    with torch.no_grad():
        output = transformer(video, torch.randn(1, config.max_text_seq_length, config.text_embed_dim),
                             torch.tensor([500]), ofs=torch.tensor([2.0]) if config.ofs_embed_dim else None,
                             return_dict=False)[0]
    assert torch.equal(video_tokens(output, config.patch_size, config.patch_size_t), captured[0])
