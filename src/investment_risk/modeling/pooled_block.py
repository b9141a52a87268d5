"""The last block at the one position the regression head reads: PyTorch's twin of export/pooling.py.

The head reads the last block's output at one position per row (BERT's first token, a decoder's last real token),
and past that block's attention nothing mixes positions. So the block needs keys and values at every position, but
its query, attention output, MLP and norms at that one row only: one block's worth less work in training,
validation and torch scoring (1/28 of a Qwen2.5-1.5B, 1/6 of minilm). The layer keeps its parameters and names
(checkpoints, adapters and merges see nothing); only its `forward` changes, and the model's last hidden state then
holds the pooled row at every position, which is all the head reads. Export leaves the model as it is: the graph
pass pools there.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

from .presets import CAUSAL_TYPES

POSITIONS = "pooled_positions"  # the pooled layer's attribute (compile_blocks leaves that layer eager)
ENCODER_TYPES = ("bert", "roberta")  # the head reads the first token ([CLS], RoBERTa's <s>)


@dataclass
class _Positions:
    """Each row's position the head reads: the first, or (a decoder) set by the backbone's pre-hook for the pass
    that follows."""

    first: bool = False
    rows: Any = None
    keys: Any = None  # (batch, length) bool: the attention mask's real tokens, or None for all
    window: int | None = None  # a decoder's sliding window: keys within it of the query


def pool_last_block(model: Any) -> bool:
    """Make `model`'s last block compute only at the rows' head positions; False (nothing changed) for an
    architecture this does not know or a model already pooled."""
    for backbone in model.modules():
        model_type = getattr(getattr(backbone, "config", None), "model_type", None)
        if model_type in CAUSAL_TYPES and hasattr(backbone, "layers") and hasattr(backbone, "embed_tokens"):
            return _pool_decoder(backbone)
        if model_type in ENCODER_TYPES and hasattr(backbone, "encoder") and hasattr(backbone, "embeddings"):
            return _pool(backbone.encoder.layer[-1], _Positions(first=True), _pooled_encoder_forward)
    return False


def _pool(layer: Any, positions: _Positions, forward: Any) -> bool:
    if hasattr(layer, POSITIONS):
        return False
    setattr(layer, POSITIONS, positions)
    # Bound to the instance, so a deep copy rebinds it to the copied layer (and its copied positions).
    layer.forward = types.MethodType(forward, layer)
    return True


def _pool_decoder(backbone: Any) -> bool:
    config = backbone.config
    layer = backbone.layers[config.num_hidden_layers - 1]
    # Qwen2 names each layer's window (None for full attention); Mistral's attention reads its config's.
    attn = layer.self_attn
    positions = _Positions(window=attn.sliding_window if hasattr(attn, "sliding_window")
                           else getattr(config, "sliding_window", None))
    if not _pool(layer, positions, _pooled_decoder_forward):
        return False
    backbone.register_forward_pre_hook(
        functools.partial(_read_positions, positions, config.get_text_config().pad_token_id), with_kwargs=True)
    return True


def _read_positions(positions: _Positions, pad_id: int | None, module: Any, args: tuple, kwargs: dict) -> None:
    """The rightmost non-pad token of each row: where the sequence-classification head gathers its logits."""
    import torch

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    positions.keys = mask.bool() if mask is not None and mask.dim() == 2 else None
    if input_ids is None or (mask is not None and positions.keys is None):
        positions.rows = None  # embeddings, or a prepared mask: what the head reads is not known here; run whole
    elif pad_id is None:
        positions.rows = torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
    else:
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions.rows = (index * (input_ids != pad_id)).argmax(-1)


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pooled_decoder_forward(layer: Any, hidden_states: Any, *args: Any, position_embeddings: Any = None,
                            **kwargs: Any) -> Any:
    import torch

    where = getattr(layer, POSITIONS)
    at = where.rows
    caching = kwargs.get("use_cache") or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
    if at is None or position_embeddings is None or caching or args:
        return type(layer).forward(layer, hidden_states, *args, position_embeddings=position_embeddings, **kwargs)
    attn, config = layer.self_attn, layer.self_attn.config
    batch, length, _ = hidden_states.shape
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    rows = torch.arange(batch, device=hidden_states.device)

    normed = layer.input_layernorm(hidden_states)
    query = attn.q_proj(normed[rows, at]).view(batch, heads, 1, head_dim)
    key = attn.k_proj(normed).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # (batch or 1, length, head_dim)
    query = query * cos[rows, at][:, None, None] + _rotate_half(query) * sin[rows, at][:, None, None]
    key = key * cos[:, None] + _rotate_half(key) * sin[:, None]
    # The causal mask's row at the pooled token: itself and the real tokens before it (within the window).
    index = torch.arange(length, device=at.device)[None, :]
    visible = index <= at[:, None]
    if where.keys is not None:
        visible &= where.keys | (index == at[:, None])
    if where.window is not None:
        visible &= index > at[:, None] - where.window
    visible = visible[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, scale=attn.scaling, enable_gqa=heads != kv_heads,
        dropout_p=attn.attention_dropout if layer.training else 0.0)
    hidden = hidden_states[rows, at] + attn.o_proj(out.reshape(batch, heads * head_dim))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden[:, None, :].expand(batch, length, -1)


def _pooled_encoder_forward(layer: Any, hidden_states: Any, attention_mask: Any = None, *args: Any,
                            **kwargs: Any) -> Any:
    """A BERT layer at the first token: its query against every key, then the output projection, the feed-forward
    and their norms (and dropouts) on one row."""
    import torch

    if any(a is not None for a in args) or kwargs.get("encoder_hidden_states") is not None \
            or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    attn = layer.attention.self
    batch, length, _ = hidden_states.shape
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    first = hidden_states[:, :1]
    query = attn.query(first).view(batch, 1, heads, head_dim).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
    # The mask the layer is given (bidirectional: every query row alike, or None without padding), at the first row.
    mask = None if attention_mask is None else attention_mask[:, :, :1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=attn.scaling, dropout_p=attn.dropout.p if layer.training else 0.0)
    attended = layer.attention.output(out.transpose(1, 2).reshape(batch, 1, heads * head_dim), first)
    return layer.output(layer.intermediate(attended), attended).expand(batch, length, -1)
