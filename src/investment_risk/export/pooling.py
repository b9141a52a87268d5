"""Pooling before the last block: a scorer reads one position of the last hidden state (BERT's first token, a
decoder's last real token), and past the last attention nothing mixes positions, so the last block's output
projection, its MLP and the norms after it need run at that position only. The scores are the same; the work saved
is most of a block (minilm, 6 layers: ONNX Runtime fp32 +12 % / +10 % rows/s at 128 / 512 tokens; Qwen2.5-1.5B:
1/28 of its matmuls).

    attention -> [Reshape...] -> MatMul (output projection) -> [Add bias...] -> residual join -> per-token ops -> head
                                ^ pooled here                               ^ and its residual input pooled here

At the first token (BERT), attention itself runs for that one query: the query projection's input is pooled
instead of attention's output, and the attention bias cut to its first row; the keys and values stay at every
position. A packed `Attention` is unpacked for this one block (minilm at 512 tokens: ONNX Runtime fp32 +15 %,
OpenVINO's static int8 twin +11 % rows/s). A decoder's query passes through the rotary first, and its attention is
a small share of a Qwen2 block: it keeps the pooling after attention.

The head is what reads the position: `Gather(axis=1, index 0)` (the first token, which then reads a sequence of
one), `GatherND(batch_dims=1)` at (batch, 1) indices, or the dynamo export of transformers' last-token pooling,
`GatherND` at `Concat(Unsqueeze(Range), Unsqueeze(positions))` (both then read a sequence of one: a Squeeze).
A graph of any other shape is left as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
# Operators that compute each position from that position alone (weights broadcast over the sequence).
PER_POSITION_OPS = frozenset({
    "MatMul", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Erf", "Cast", "LayerNormalization",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu", "Gelu",
    "FastGelu", "QuickGelu"})
SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
POOLED = "/pooled"  # the suffix of the pooled values: what is past the pooling is found from them
# The attributes of an attention whose query may run alone: any other (a causal mask, rotary) leaves it as it is.
SHARED_ATTENTION_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value", "qkv_hidden_sizes")


def pool_last_block(path: Path) -> bool:
    """`path`'s graph pooled before its last block, in place (the graph only: its weights, when external, stay
    where its references say); whether the graph had the shape for it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    pooled = pool_graph(model.graph)
    if pooled:
        onnx.save_model(model, str(path))
    return pooled


def pooled_nodes(path: Path) -> list[str]:
    """The names of the nodes past the pooling (the last block's projections and MLP, the head): they run on one
    position a row, so quantising them saves nothing, and a static int8 twin would calibrate their activations on
    one vector per calibration row (NNCF on tiny-qwen2: max |Δ| 0.29 against 0.045 unpooled). The int8 twins
    leave them in fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    pooled = {name for node in graph.node for name in node.output if name.endswith(POOLED)}
    return [node.name for node in _past(graph.node, pooled) if node.name]


def _one_along(info: Any, axis: int, name: str = "") -> Any:
    """A copy of the ValueInfoProto `info` with a length of one along `axis` (and `name`, if given)."""
    copied = info.__deepcopy__()
    copied.name = name or info.name
    copied.type.tensor_type.shape.dim[axis].Clear()
    copied.type.tensor_type.shape.dim[axis].dim_value = 1
    return copied


def _keeps_two_axes(reshape: Any, weights: dict[str, Any]) -> bool:
    """Whether a Reshape copies its input's first two axes (a shape initializer starting 0, 0)."""
    from onnx import numpy_helper

    shape = weights.get(reshape.input[1])
    return shape is not None and not shape.external_data and list(numpy_helper.to_array(shape)[:2]) == [0, 0]


def _three_dimensional(recorded: dict[str, Any], name: str) -> bool:
    return name in recorded and len(recorded[name].type.tensor_type.shape.dim) == 3


def _past(nodes: Any, values: set[str]) -> list[Any]:
    """The nodes that read `values` or what those nodes write, in turn; `nodes` in topological order. `values`
    grows by what they write."""
    found = []
    for node in nodes:
        if values & set(_reads(node)):
            values.update(node.output)
            found.append(node)
    return found


def pool_graph(graph: Any) -> bool:
    """The rewrite of `pool_last_block` on a GraphProto; False (and the graph untouched) where it does not apply."""
    from onnx import helper, numpy_helper

    nodes = list(graph.node)
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in _reads(node):
            readers.setdefault(name, []).append(node)
    producer = {out: node for node in nodes for out in node.output if out}
    weights = {t.name: t for t in graph.initializer}
    recorded = {v.name: v for v in (*graph.input, *graph.value_info) if v.type.tensor_type.HasField("shape")}

    def only_reader(name: str) -> Any:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 else None

    attention = [n for n in nodes if n.op_type in ATTENTION_OPS][-1:]
    if not attention:
        return False
    hidden = attention[0].output[0]
    reshapes = []
    while (node := only_reader(hidden)) is not None and node.op_type == "Reshape":
        hidden = node.output[0]
        reshapes.append(node)
    projection = only_reader(hidden)
    if projection is None or projection.op_type != "MatMul" or projection.input[0] != hidden:
        return False
    out = projection.output[0]
    while (join := only_reader(out)) is not None and join.op_type == "Add" and \
            any(name in weights for name in join.input):
        out = join.output[0]
    if join is None or join.op_type not in (*SKIP_NORMS, "Add") or out not in join.input[:2]:
        return False
    residual_at = 1 - list(join.input[:2]).index(out)
    residual = join.input[residual_at]
    if not (_three_dimensional(recorded, hidden) and _three_dimensional(recorded, residual)):
        return False
    head = _head_after(join, readers)
    if head is None:
        return False
    position = _pooled_position(head, producer, weights)
    if position is None:
        return False

    prefix = f"{projection.name or projection.output[0]}/pooled"
    query = None  # the last attention's query projection, where it can run at the pooled position alone
    # (attention's output then has one position: a Reshape after it may only keep the batch and sequence axes)
    one_query = position == "first" and all(_keeps_two_axes(r, weights) for r in reshapes)
    if one_query and (unpacked := _unpacked_attention(attention[0], producer, only_reader, recorded)):
        # packed Q, K and V projections cannot run the query alone: this one block's become three MatMuls again
        at = nodes.index(attention[0])
        nodes[at:at + 1] = unpacked
        nodes.remove(producer[attention[0].input[1]])  # the packed weights' Concat, read by nothing now
        attention[0], query = unpacked[-1], unpacked[0]
    elif one_query:
        query = _query_projection(attention[0], producer, only_reader, recorded)
    added = []
    if position == "first":
        graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{prefix}/start"),
                                  numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/one")])
        pool = lambda name: helper.make_node(  # noqa: E731
            "Slice", [name, f"{prefix}/start", f"{prefix}/one", f"{prefix}/one"], [name + POOLED],
            name=f"{name}/pool")
    else:
        graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, 1], np.int64), f"{prefix}/shape"))
        added.append(helper.make_node("Reshape", [position, f"{prefix}/shape"], [f"{prefix}/index"],
                                      name=f"{prefix}/index"))
        pool = lambda name: helper.make_node(  # noqa: E731
            "GatherND", [name, f"{prefix}/index"], [name + POOLED], name=f"{name}/pool", batch_dims=1)
        # the head reads a sequence of one now
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis"))
        squeeze = helper.make_node("Squeeze", [head.input[0], f"{prefix}/axis"], list(head.output),
                                   name=head.name or f"{prefix}/head")
        nodes[nodes.index(head)] = squeeze
    # With a query projection of its own, attention runs for the one query row: the projection's input is pooled
    # instead of attention's output (in BERT it is the residual too), and the attention bias is cut to that row.
    first_pooled = query if query is not None else projection
    pooled_inputs = list(dict.fromkeys([query.input[0] if query is not None else hidden, residual]))
    if query is not None and len(attention[0].input) > 5 and (bias := attention[0].input[5]):
        graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), f"{prefix}/query_axis"))
        added.append(helper.make_node("Slice", [bias, f"{prefix}/start", f"{prefix}/one", f"{prefix}/query_axis"],
                                      [bias + POOLED], name=f"{bias}/pool"))
        attention[0].input[5] = bias + POOLED
        if bias in recorded and len(recorded[bias].type.tensor_type.shape.dim) == 4:
            graph.value_info.append(_one_along(recorded[bias], 2, bias + POOLED))
    added += [pool(name) for name in pooled_inputs]
    if query is not None:
        query.input[0] += POOLED
    else:
        projection.input[0] += POOLED
    join.input[residual_at] = residual + POOLED
    at = nodes.index(first_pooled)
    nodes = nodes[:at] + added + nodes[at:]
    # Shapes recorded past the pooling say (batch, sequence, ...): a sequence of one now. Kept, not dropped:
    # the contrib operators have no shape inference, and NNCF's graph needs the shapes to see its edges.
    graph.value_info.extend(_one_along(recorded[name], 1, name + POOLED) for name in pooled_inputs)
    pooled = {name + POOLED for name in pooled_inputs}
    _past(nodes[at:], pooled)
    for info in graph.value_info:
        if info.name in pooled and len(info.type.tensor_type.shape.dim) == 3:
            info.CopyFrom(_one_along(info, 1))
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return True


def _query_projection(attention: Any, producer: dict[str, Any], only_reader: Any, recorded: dict[str, Any]) -> Any:
    """The MatMul that projects a MultiHeadAttention's query, where it projects the query alone (the graph before
    attention was packed) and attention is bidirectional, with no past and no key padding mask (whose forms may
    carry a row per query); None otherwise."""
    inputs = list(attention.input) + [""] * 8
    if attention.op_type != "MultiHeadAttention" or not inputs[1] or not inputs[2] or any(inputs[i] for i in (4, 6, 7)) \
            or inputs[0] in inputs[1:3] or _plain_attributes(attention) is None:
        return None
    matmul = producer.get(inputs[0])
    if matmul is None or matmul.op_type != "MatMul" or only_reader(inputs[0]) is not attention or \
            not _three_dimensional(recorded, matmul.input[0]):
        return None
    return matmul


def _plain_attributes(attention: Any) -> dict[str, Any] | None:
    """An attention node's attributes where they are all SHARED_ATTENTION_ATTRIBUTES and it has one output (no
    present key/value or scores beside it); None otherwise."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    if set(attributes) - set(SHARED_ATTENTION_ATTRIBUTES) or len(attention.output) != 1:
        return None
    return attributes


def _unpacked_attention(attention: Any, producer: dict[str, Any], only_reader: Any,
                        recorded: dict[str, Any]) -> list[Any] | None:
    """[query MatMul, key MatMul, value MatMul, MultiHeadAttention] computing what a packed `Attention` does, where
    its packed weights are a Concat of the three (as onnxscript's fusion writes them) and it has no mask index or
    past; None otherwise."""
    from onnx import helper

    inputs = list(attention.input) + [""] * 7
    attributes = _plain_attributes(attention)
    packed = producer.get(inputs[1])
    if attention.op_type != "Attention" or attributes is None or any(inputs[i] for i in (3, 4, 6)) or \
            len(set(attributes.get("qkv_hidden_sizes", [0]))) != 1 or packed is None or packed.op_type != "Concat" or \
            len(packed.input) != 3 or {a.i for a in packed.attribute if a.name == "axis"} - {1, -1} or \
            only_reader(inputs[1]) is not attention or not _three_dimensional(recorded, inputs[0]):
        return None
    prefix = attention.name or attention.output[0]
    projections = [helper.make_node("MatMul", [inputs[0], weight], [f"{prefix}/{part}"], name=f"{prefix}/{part}")
                   for part, weight in zip(("query", "key", "value"), packed.input)]
    kept = {name: value for name, value in attributes.items() if name != "qkv_hidden_sizes"}
    mha_inputs = [*(p.output[0] for p in projections), inputs[2], "", inputs[5]]
    while not mha_inputs[-1]:
        mha_inputs.pop()
    mha = helper.make_node("MultiHeadAttention", mha_inputs, list(attention.output), name=prefix,
                           domain="com.microsoft", **kept)
    return [*projections, mha]


def _head_after(join: Any, readers: dict[str, list[Any]]) -> Any:
    """The one node that reads a position out of the last block's output, every node between it and the join
    working position by position; None otherwise."""
    heads, seen, frontier = [], set(), [name for name in join.output if name]
    while frontier:
        name = frontier.pop()
        for node in readers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Gather", "GatherND") and node.input[0] == name:
                heads.append(node)
            elif node.op_type in PER_POSITION_OPS:
                frontier.extend(name for name in node.output if name)
            else:
                return None
    return heads[0] if len(heads) == 1 else None


def _pooled_position(head: Any, producer: dict[str, Any], weights: dict[str, Any]) -> str | None:
    """'first', or the name of a (batch,) or (batch, 1) tensor of the positions `head` reads; None when it is not
    one of the heads this module knows."""
    from onnx import numpy_helper

    attributes = {a.name: a.i for a in head.attribute}
    if head.op_type == "Gather":
        tensor = weights.get(head.input[1])
        if tensor is None and (made := producer.get(head.input[1])) is not None and made.op_type == "Constant":
            tensor = made.attribute[0].t
        index = None if tensor is None or tensor.external_data else numpy_helper.to_array(tensor)
        first = index is not None and index.ndim == 0 and int(index) == 0
        return "first" if first and attributes.get("axis", 0) == 1 else None
    if attributes.get("batch_dims", 0) == 1:  # (batch, 1) positions, as an ArgMax that keeps its axis makes them
        made = producer.get(head.input[1])
        kept = made is not None and made.op_type == "ArgMax" and \
            {a.name: a.i for a in made.attribute}.get("keepdims", 1) == 1
        return head.input[1] if kept else None
    concat = producer.get(head.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    rows, positions = (producer.get(name) for name in concat.input)
    if rows is None or positions is None or rows.op_type != "Unsqueeze" or positions.op_type != "Unsqueeze":
        return None
    if (made := producer.get(rows.input[0])) is None or made.op_type != "Range":
        return None
    return positions.input[0]


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """`nodes` in an order where each comes after what it reads, otherwise as they were (the positions a head reads
    are computed at its end in an exported graph; the pooling reads them earlier now)."""
    import heapq

    waiting = {i: {name for name in _reads(node) if name not in available} for i, node in enumerate(nodes)}
    makers = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    dependants: dict[int, list[int]] = {}
    for i, names in waiting.items():
        waiting[i] = {makers[name] for name in names if name in makers}  # others: outer scope or graph inputs
        for j in waiting[i]:
            dependants.setdefault(j, []).append(i)
    ready = [i for i, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in dependants.get(i, []):
            waiting[j].discard(i)
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the pooled graph has a cycle")
    return order


def _reads(node: Any) -> list[str]:
    """The values a node reads: its inputs and, for an `If`, what its branches read of the graph around them."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        if attribute.HasField("g"):
            names += [name for inner in attribute.g.node for name in _reads(inner)]
    return names
