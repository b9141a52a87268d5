"""A decoder's last block at the one position its regression head reads: PyTorch's twin of export/pooling.py.

The regression head reads the last block's output at each row's last real token, and past that block's attention
nothing mixes positions. So the block needs keys and values at every position, but its query, attention output,
MLP and norms at that one row only: one block's worth less work in training, validation and torch scoring (1/28 of a
Qwen2.5-1.5B). The layer keeps its parameters and names (checkpoints, adapters and merges see nothing); only its
`forward` changes, and the model's final hidden state then holds the pooled row at every position, which is all the
head reads (its rightmost-non-pad-token gather). Export leaves the model as it is: the graph pass pools there.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

from .presets import CAUSAL_TYPES

POSITIONS = "pooled_positions"  # the pooled layer's attribute (compile_blocks leaves that layer eager)


@dataclass
class _Positions:
    """Each row's position the head reads, set by the backbone's pre-hook for the pass that follows."""

    rows: Any = None


def pool_last_block(model: Any) -> bool:
    """Make `model`'s last decoder block compute only at the rows' head positions; False (nothing changed) for an
    architecture this does not know (BERT, a sliding window, a model already pooled)."""
    backbone = next((m for m in model.modules() if hasattr(m, "layers") and hasattr(m, "embed_tokens")
                     and getattr(getattr(m, "config", None), "model_type", None) in CAUSAL_TYPES), None)
    if backbone is None:
        return False
    config = backbone.config
    layer = backbone.layers[config.num_hidden_layers - 1]
    if hasattr(layer, POSITIONS) or getattr(layer.self_attn, "sliding_window", None) is not None:
        return False
    positions = _Positions()
    backbone.register_forward_pre_hook(
        functools.partial(_read_positions, positions, config.get_text_config().pad_token_id), with_kwargs=True)
    setattr(layer, POSITIONS, positions)
    # Bound to the instance, so a deep copy rebinds it to the copied layer (and its copied positions).
    layer.forward = types.MethodType(_pooled_forward, layer)
    return True


def _read_positions(positions: _Positions, pad_id: int | None, module: Any, args: tuple, kwargs: dict) -> None:
    """The rightmost non-pad token of each row: where the sequence-classification head gathers its logits."""
    import torch

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:  # embeddings given: the head's position is unknown here, so the block runs whole
        positions.rows = None
    elif pad_id is None:
        positions.rows = torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
    else:
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions.rows = (index * (input_ids != pad_id)).argmax(-1)


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pooled_forward(layer: Any, hidden_states: Any, *args: Any, position_embeddings: Any = None, **kwargs: Any) -> Any:
    import torch

    at = getattr(layer, POSITIONS).rows
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
    # Right padding: the pooled token sees itself and every position before it (the causal mask's row).
    visible = (torch.arange(length, device=at.device)[None, :] <= at[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, scale=attn.scaling, enable_gqa=heads != kv_heads,
        dropout_p=attn.attention_dropout if layer.training else 0.0)
    hidden = hidden_states[rows, at] + attn.o_proj(out.reshape(batch, heads * head_dim))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden[:, None, :].expand(batch, length, -1)
