"""Helpers for tests that compare megatron models across parallel layouts.

Weights are made from parameter *names* (global layer numbers), whole, then sliced for this
rank the way megatron slices them; gradients are gathered back into whole tensors. So a model
split any way can be compared with one process holding all of it, without our conversion code.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def global_name(model, name: str) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x`` (layer_number is 1-based, global)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _is_split(p) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def full_shape(p) -> list[int]:
    shape = list(p.shape)
    if _is_split(p):
        shape[p.partition_dim] *= _tp()[1]
    return shape


def shard(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's slice of ``full``, as megatron's CPU initialisation cuts it (with its stride)."""
    if not _is_split(p):
        return full
    rank, size = _tp()
    stride = getattr(p, "partition_stride", 1)
    chunks = torch.chunk(full, size * stride, dim=p.partition_dim)
    return torch.cat(chunks[rank::size], dim=p.partition_dim)


def unshard(shards: list[torch.Tensor], p) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's slice."""
    stride = getattr(p, "partition_stride", 1)
    pieces = [torch.chunk(s, stride, dim=p.partition_dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=p.partition_dim)


def fill_by_name(model, vocab_size: int, padding_value: float = 3.0) -> None:
    """Deterministic weights from each parameter's global name, whatever the TP/PP layout.

    Rows of the embedding and output layer past ``vocab_size`` (vocabulary padding) get
    ``padding_value``: large logits that would swamp the softmax unless they are masked.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = global_name(model, name)
            g = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
            shape = full_shape(p)
            if gname in VOCAB_NAMES:
                real = torch.randn([vocab_size] + shape[1:], generator=g) * 0.5
                full = torch.cat([real, torch.full([shape[0] - vocab_size] + shape[1:], padding_value)])
            elif "layernorm" in name:
                full = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                full = torch.randn(shape, generator=g) * 0.08
            p.copy_(shard(full, p))


def full_grads(model, vocab_size: int, finalized: bool = False) -> dict[str, torch.Tensor]:
    """``{global name: whole gradient}`` for this pipeline stage's trained parameters, vocabulary
    padding rows dropped.

    ``finalized``: megatron's ``finalize_model_grads`` already summed sequence-parallel grads.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.main_grad if hasattr(p, "main_grad") else p.grad
        grad = grad.detach().clone()
        if getattr(p, "sequence_parallel", False) and not finalized:
            # Each rank saw a slice of the sequence (megatron's finalize_model_grads does this sum).
            dist.all_reduce(grad, group=group)
        if _is_split(p):
            shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, grad, group=group)
            grad = unshard(shards, p)
        gname = global_name(model, name)
        out[gname] = grad[:vocab_size] if gname in VOCAB_NAMES else grad
    return out


def make_batch(prompt_lens, response_lens, seq: int, vocab: int, *, seed: int = 0, emb_dim: int = 8,
               paired: bool = True, pad_id: int = 0, packed_length: int | None = None,
               sequence_multiple: int = 1) -> dict:
    """A microbatch by the batch contract; for paired data the first half are the chosen rows.

    Row b holds ``prompt_lens[b]`` prompt tokens then ``response_lens[b]`` response tokens,
    right-padded with ``pad_id``. Paired rows i and i + P share their prompt tokens and embedding.
    With ``packed_length`` the same sequences (same seed, same values) come packed into one row
    of that many tokens instead.
    """
    from megatron_rpo.data.packing import token_fields

    g = torch.Generator().manual_seed(seed)
    rows = len(prompt_lens)
    half = rows // 2
    emb = torch.randn(rows, emb_dim, generator=g)
    sequences = []
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        assert p + r <= seq
        ids = torch.randint(1, vocab, (p + r,), generator=g)
        if paired and b >= half:
            assert p == prompt_lens[b - half]
            ids[:p] = sequences[b - half][:p]
            emb[b] = emb[b - half]
        sequences.append(ids)
    packed = packed_length is not None
    batch = token_fields(sequences, list(prompt_lens), packed=packed, length=packed_length if packed else seq,
                         pad_id=pad_id, sequence_multiple=sequence_multiple)
    batch.update({
        "is_chosen": torch.arange(rows) < half if paired else torch.rand(rows, generator=g) < 0.5,
        "prompt_embedding": torch.nn.functional.normalize(emb, dim=1),
        "ref_logps": -torch.rand(rows, generator=g) * 20.0,
        "pair_id": torch.arange(rows) % half if paired else torch.arange(rows),
    })
    return batch


VOCAB = 100  # not a multiple of 8 x TP: the model carries vocabulary padding rows
SEQ = 24


def tiny_config(tp: int = 1, pp: int = 1, sp: bool = False, **loss):
    """A 4-layer GQA Llama-shaped model small enough for gloo tests."""
    from megatron_rpo.config import config_from_dict

    return config_from_dict({
        "model": dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                      vocab_size=VOCAB, make_vocab_size_divisible_by=8, max_position_embeddings=64),
        "parallel": dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp),
        "data": dict(max_prompt_length=12, max_length=SEQ),
        "loss": loss,
    })


@torch.no_grad()
def layout_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """``model``'s logits of ``tokens`` through megatron's (pipeline) schedule, forward only: whole
    ([b, s, vocab_size], gathered over TP, vocabulary padding dropped) on the last pipeline stage,
    None on the others."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    kept = []

    def step(_, m):
        out = m(tokens, positions, None)
        if ps.is_pipeline_last_stage():
            kept.append(out.detach().clone())
        return out, lambda o: (o.sum() * 0.0, {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=tokens.shape[1],
                                micro_batch_size=tokens.shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(kept[0]) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, kept[0].contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]
