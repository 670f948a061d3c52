"""Sequence parallelism (Ulysses-style): one sample's tokens split over the P ranks of a sequence-parallel group.

Each rank holds a contiguous, near-equal share of the text tokens and of the video tokens, so every token lives on
exactly one rank and summing the LoRA gradients over the group gives the full gradient with no special backward.
Everything in a CogVideoX block works token by token except attention: there one all-to-all turns this rank's
[local tokens, all heads] queries, keys and values into [all tokens, a share of the heads], attention runs on the
whole sequence, and a second all-to-all turns the result back. Split sizes make uneven head counts and sequence
lengths work (the 2b model has 30 heads; 226 text tokens do not divide by 4).

The model's own `forward` cannot run on a share (it takes the text length from its input and unpatchifies the whole
sequence); `sequence_parallel_forward` calls the model's own submodules instead, so PEFT's LoRA layers and
DeepSpeed's ZeRO-3 hooks work unchanged, and returns this rank's patchified prediction. Unpatchifying is a
permutation, so the loss is taken on local tokens against the patchified target (`video_tokens`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """`total` items in `parts` contiguous near-equal shares, the larger ones first."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def share(sizes: tuple[int, ...], index: int) -> slice:
    """The items of share `index` when contiguous shares have these sizes."""
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


@dataclass(frozen=True)
class SequenceSplit:
    """How the ranks of one sequence-parallel group share a sample's tokens and the attention heads."""

    index: int
    """This rank's place in its group."""
    text: tuple[int, ...]
    """Text tokens held by each rank of the group."""
    video: tuple[int, ...]
    """Video tokens held by each rank of the group."""
    heads: tuple[int, ...]
    """Attention heads each rank of the group computes attention for."""

    @classmethod
    def of(cls, text_tokens: int, video_tokens: int, heads: int, parts: int, index: int) -> SequenceSplit:
        return cls(index, even_split(text_tokens, parts), even_split(video_tokens, parts), even_split(heads, parts))

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens (text and video) held by each rank."""
        return tuple(t + v for t, v in zip(self.text, self.video))

    def local_text(self) -> slice:
        return share(self.text, self.index)

    def local_video(self) -> slice:
        return share(self.video, self.index)


def head_imbalance(heads: int, parts: int) -> str | None:
    """A warning when `parts` ranks cannot share `heads` attention heads evenly (the busiest rank sets the pace)."""
    if heads % parts == 0:
        return None
    shares = even_split(heads, parts)
    return (f"parallel.sequence_parallel {parts} does not divide the model's {heads} attention heads: ranks compute "
            f"attention for {shares[0]} or {shares[-1]} heads, so attention takes {shares[0] * parts / heads:.2f}x "
            "as long as an even share would")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of a flat tensor with split sizes; its gradient is the same exchange reversed."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = flat.new_empty(sum(receive))
        dist.all_to_all_single(out, flat.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.receive,
                               group=ctx.group)
        return out, None, None, None


SHAPES_ONLY = "shapes only"
"""A stand-in for the group when the memory planner traces one rank alone under fake tensors: every exchange then
returns new tensors of the shapes the other ranks would send."""


class _ShapesOnly(torch.autograd.Function):
    """The all-to-all's memory without the other ranks: a new tensor of the received size, and in backward of the
    sent size."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
        ctx.sent = sum(send)
        return flat.new_empty(sum(receive))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad.new_empty(ctx.sent), None, None, None


def _exchange(pieces: list[torch.Tensor], receive_shapes: list[tuple[int, ...]], group: Any) -> list[torch.Tensor]:
    """Send pieces[j] to rank j of the group; returns what each rank sent here, shaped as `receive_shapes`."""
    if len(pieces) == 1:
        return pieces
    send = [p.numel() for p in pieces]
    receive = [int(torch.Size(s).numel()) for s in receive_shapes]
    exchange = _ShapesOnly if group is SHAPES_ONLY else _AllToAll
    flat = exchange.apply(torch.cat([p.reshape(-1) for p in pieces]), send, receive, group)
    return [chunk.view(shape) for chunk, shape in zip(flat.split(receive), receive_shapes)]


def heads_to_sequence(qkv: torch.Tensor, split: SequenceSplit, group: Any) -> torch.Tensor:
    """[3, B, heads, local tokens, d] -> [3, B, this rank's heads, all tokens, d] (tokens in rank order)."""
    three, batch, _, _, dim = qkv.shape
    pieces = list(qkv.split(list(split.heads), dim=2))
    mine = split.heads[split.index]
    shapes = [(three, batch, mine, tokens, dim) for tokens in split.tokens]
    return torch.cat(_exchange(pieces, shapes, group), dim=3)


def sequence_to_heads(out: torch.Tensor, split: SequenceSplit, group: Any) -> torch.Tensor:
    """[B, this rank's heads, all tokens, d] -> [B, heads, local tokens, d]: the inverse of `heads_to_sequence`."""
    batch, _, _, dim = out.shape
    pieces = list(out.split(list(split.tokens), dim=2))
    local = split.tokens[split.index]
    shapes = [(batch, heads, local, dim) for heads in split.heads]
    return torch.cat(_exchange(pieces, shapes, group), dim=1)


class SequenceParallelAttention:
    """CogVideoX's joint text-video attention on this rank's share of the tokens: projections, q/k norms and rotary
    embeddings (this rank's video rows) locally, one all-to-all of q, k and v together, attention over the whole
    sequence for this rank's heads, an all-to-all back, the output projection locally."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 sequence_split: SequenceSplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # image_rotary_emb and sequence_split must be named here: Attention.forward drops keywords its processor
        # does not declare.
        if attention_mask is not None or sequence_split is None:
            raise ValueError("sequence-parallel attention takes no mask and needs the sequence split")
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.size(1)
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = tokens.shape
        heads = attn.heads
        projected = []
        for project, norm, rotate in ((attn.to_q, attn.norm_q, True), (attn.to_k, attn.norm_k, not
                                      attn.is_cross_attention), (attn.to_v, None, False)):
            x = project(tokens)
            x = x.view(batch, length, heads, x.shape[-1] // heads).transpose(1, 2)
            if norm is not None:
                x = norm(x)
            if rotate and image_rotary_emb is not None:
                x = torch.cat([x[:, :, :text], apply_rotary_emb(x[:, :, text:], image_rotary_emb)], dim=2)
            projected.append(x)
        whole = heads_to_sequence(torch.stack(projected), sequence_split, self.group)
        out = F.scaled_dot_product_attention(whole[0], whole[1], whole[2], dropout_p=0.0, is_causal=False)
        out = sequence_to_heads(out, sequence_split, self.group)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text, length - text], dim=1)
        return video_out, encoder_out


def sequence_parallel_forward(transformer: torch.nn.Module, group: Any, parts: int, index: int,
                              hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              timestep: torch.Tensor, ofs: torch.Tensor | None = None,
                              image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                              return_dict: bool = False, **_: Any) -> tuple[torch.Tensor]:
    """The transformer's forward on this rank's share of the tokens: (prediction [B, local video tokens, patch
    values],) in the layout of `video_tokens`. Embeddings of the whole input are computed on every rank (they are
    frozen and cheap) and cut to the share before the blocks."""
    model: Any = transformer
    dtype = hidden_states.dtype
    emb = model.time_embedding(model.time_proj(timestep).to(dtype=dtype), None)
    if model.ofs_embedding is not None:
        emb = emb + model.ofs_embedding(model.ofs_proj(ofs).to(dtype=dtype))
    embedded = model.embedding_dropout(model.patch_embed(encoder_hidden_states, hidden_states))
    text_length = encoder_hidden_states.shape[1]
    split = SequenceSplit.of(text_length, embedded.shape[1] - text_length, model.config.num_attention_heads, parts,
                             index)
    text = embedded[:, :text_length][:, split.local_text()]
    video = embedded[:, text_length:][:, split.local_video()]
    rotary = None
    if image_rotary_emb is not None:
        rotary = tuple(part[split.local_video()] for part in image_rotary_emb)
    kwargs = {"sequence_split": split}
    for block in model.transformer_blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            video, text = model._gradient_checkpointing_func(block, video, text, emb, rotary, kwargs)
        else:
            video, text = block(hidden_states=video, encoder_hidden_states=text, temb=emb, image_rotary_emb=rotary,
                                attention_kwargs=kwargs)
    # norm_final is a LayerNorm over each token: the text tokens the 5b models pass through it are cut off after.
    video = model.proj_out(model.norm_out(model.norm_final(video), temb=emb))
    return (video,)


def video_tokens(video: torch.Tensor, patch: int, patch_t: int | None) -> torch.Tensor:
    """[B, F, C, H, W] -> [B, tokens, values per token]: the inverse of the transformer's unpatchify, so that token
    i of the prediction and of this tensor describe the same latent elements."""
    batch, frames, channels, height, width = video.shape
    if patch_t is None:
        grid = video.reshape(batch, frames, channels, height // patch, patch, width // patch, patch)
        return grid.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, frames * (height // patch) * (width // patch), -1)
    grid = video.reshape(batch, frames // patch_t, patch_t, channels, height // patch, patch, width // patch, patch)
    tokens = (frames // patch_t) * (height // patch) * (width // patch)
    return grid.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(batch, tokens, -1)


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's sequence-parallel group, once the transformer runs on shares of the tokens."""

    group: Any
    parts: int
    index: int

    def local_rows(self, held: int, total: int) -> slice:
        """The rows of a sample's `total` video tokens this rank holds (`held` of them, checked)."""
        rows = share(even_split(total, self.parts), self.index)
        if rows.stop - rows.start != held:
            raise ValueError(f"sequence-parallel rank {self.index} holds {held} of {total} video tokens, not "
                             f"{rows.stop - rows.start}")
        return rows


def enable_sequence_parallel(transformer: torch.nn.Module, group: Any, parts: int, index: int) -> SequenceParallel:
    """Make `transformer` run on this rank's share of each sample's tokens: the sequence-parallel attention in every
    block and `sequence_parallel_forward` as its forward (its call then returns local prediction tokens)."""
    transformer.set_attn_processor(SequenceParallelAttention(group))  # type: ignore[operator]
    # An instance attribute: nn.Module.__call__ (and with it DeepSpeed's hooks) calls it in place of the class's.
    transformer.forward = functools.partial(sequence_parallel_forward, transformer, group, parts, index)
    return SequenceParallel(group, parts, index)
