"""Pooling before the last block (export/pooling.py) on small hand-made graphs: where the head reads one position the
graph computes its last block there only and scores the same (at the first token, attention too runs for that one
query, packed or not); where it reads them all, nothing changes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from investment_risk.export.pooling import pool_graph, pooled_nodes

HIDDEN, HEADS = 8, 2


def attention_nodes(attention: str) -> tuple[list, list]:
    """Nodes and weights computing `attended` from `x`: attention over x itself ("self"); with its own Q, K and V
    projections, a packed bias and a (batch, 1, S, S) attention bias ("projected", the graph before packing); or
    the same packed into one Attention ("packed", as onnxscript's fusion writes it)."""
    rng = np.random.default_rng(2)
    weight = lambda name, *shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)  # noqa: E731
    if attention == "self":
        return [helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["attended"], domain="com.microsoft",
                                 num_heads=HEADS)], []
    weights = [weight(f"w_{part}", HIDDEN, HIDDEN) for part in "qkv"] + [weight("b_qkv", 3 * HIDDEN)]
    if attention == "projected":
        return [*(helper.make_node("MatMul", ["x", f"w_{part}"], [part], name=f"project_{part}") for part in "qkv"),
                helper.make_node("MultiHeadAttention", ["q", "k", "v", "b_qkv", "", "attention_bias"], ["attended"],
                                 domain="com.microsoft", num_heads=HEADS)], weights
    return [helper.make_node("Concat", ["w_q", "w_k", "w_v"], ["w_qkv"], axis=1),
            helper.make_node("Attention", ["x", "w_qkv", "b_qkv", "", "", "attention_bias"], ["attended"],
                             domain="com.microsoft", num_heads=HEADS, qkv_hidden_sizes=[HIDDEN] * 3)], weights


def block_graph(head: str, attention: str = "self") -> onnx.ModelProto:
    """x -> attention -> projection + bias -> residual Add -> LayerNorm -> MLP -> residual Add -> head."""
    rng = np.random.default_rng(0)
    weight = lambda name, *shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)  # noqa: E731
    nodes, attention_weights = attention_nodes(attention)
    nodes += [
        helper.make_node("Reshape", ["attended", "same_shape"], ["attended_view"]),
        helper.make_node("MatMul", ["attended_view", "w_o"], ["projected"]),
        helper.make_node("Add", ["projected", "b_o"], ["biased"]),
        helper.make_node("Add", ["biased", "x"], ["joined"]),
        helper.make_node("LayerNormalization", ["joined", "gamma", "beta"], ["normed"], axis=-1),
        helper.make_node("MatMul", ["normed", "w_up"], ["up"]),
        helper.make_node("Sigmoid", ["up"], ["gate"]),
        helper.make_node("Mul", ["up", "gate"], ["activated"]),
        helper.make_node("MatMul", ["activated", "w_down"], ["down"]),
        helper.make_node("Add", ["down", "normed"], ["hidden"]),
    ]
    initializers = [weight("w_o", HIDDEN, HIDDEN), weight("b_o", HIDDEN), weight("gamma", HIDDEN),
                    weight("beta", HIDDEN), weight("w_up", HIDDEN, 16), weight("w_down", 16, HIDDEN),
                    numpy_helper.from_array(np.array([0, 0, -1], np.int64), "same_shape"), *attention_weights]
    if head == "first":  # BERT's: the first token
        initializers.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
        nodes.append(helper.make_node("Gather", ["hidden", "zero"], ["scores"], axis=1))
    elif head == "indexed":  # at (batch, 1) positions from an ArgMax, as the model builder's graph pools
        nodes += [helper.make_node("ArgMax", ["choice"], ["positions"], axis=-1, keepdims=1),
                  helper.make_node("GatherND", ["hidden", "positions"], ["scores"], batch_dims=1)]
    elif head == "feature":  # the first feature of every position
        initializers.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
        nodes.append(helper.make_node("Gather", ["hidden", "zero"], ["scores"], axis=2))
    else:  # the mean over positions: every position counts
        nodes.append(helper.make_node("ReduceMean", ["hidden"], ["scores"], axes=[1], keepdims=0))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])]
    if head == "indexed":
        inputs.append(helper.make_tensor_value_info("choice", TensorProto.FLOAT, ["batch", "sequence"]))
    if attention != "self":
        inputs.append(helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT,
                                                    ["batch", 1, "sequence", "sequence"]))
    shapes = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
              for name in ("attended_view", "projected", "biased", "joined", "normed", "down", "hidden")]
    graph = helper.make_graph(nodes, "block", inputs,
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", HIDDEN])],
                              initializers, value_info=shapes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)  # what ONNX Runtime 1.31 reads


def run(model: onnx.ModelProto, feeds: dict, *extra: str) -> list[np.ndarray]:
    """The graph's outputs, then the values named in `extra`."""
    for name in extra:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("head", ["first", "indexed"])
def test_a_head_reading_one_position_gets_its_last_block_at_that_position_only(head):
    x = np.random.default_rng(1).normal(size=(3, 5, HIDDEN)).astype(np.float32)
    feeds = {"x": x, **({"choice": np.eye(5, dtype=np.float32)[[4, 0, 2]]} if head == "indexed" else {})}
    model = block_graph(head)
    before, = run(model, feeds)
    assert pool_graph(model.graph)
    onnx.checker.check_model(model)
    after, mlp = run(model, feeds, "down")
    assert mlp.shape == (3, 1, HIDDEN)  # the MLP ran on one position a row
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["projected", "packed"])
def test_at_the_first_token_the_last_attention_runs_for_that_query_alone(attention, tmp_path):
    rng = np.random.default_rng(3)
    # an attention bias that differs row by row: the query must read the first row's
    feeds = {"x": rng.normal(size=(3, 5, HIDDEN)).astype(np.float32),
             "attention_bias": rng.normal(size=(3, 1, 5, 5)).astype(np.float32)}
    model = block_graph("first", attention)
    before, = run(model, feeds)
    assert pool_graph(model.graph)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
    query = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "w_q")
    after, projected, attended = run(model, feeds, query.output[0], "attended")
    assert projected.shape == attended.shape == (3, 1, HIDDEN)  # the query projection and attention: one row each
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # the int8 twins leave the one-row query projection in fp32, and quantise the keys' and values'
    onnx.save(model, str(tmp_path / "model.onnx"))
    past = {n.input[1] for n in model.graph.node if n.name in pooled_nodes(tmp_path / "model.onnx")}
    assert "w_q" in past and not past & {"w_k", "w_v"}


@pytest.mark.parametrize("kind", ["causal", "key_padding_mask", "reshape"])
def test_an_attention_whose_query_cannot_run_alone_is_pooled_after_it(kind):
    """A causal mask (its one query would be read as the last position), a key padding mask (some of its forms
    hold a row per query) or a Reshape after attention that names the sequence's length: attention runs for every
    query, the block after it at the first token."""
    rng = np.random.default_rng(4)
    feeds = {"x": rng.normal(size=(3, 5, HIDDEN)).astype(np.float32),
             "attention_bias": rng.normal(size=(3, 1, 5, 5)).astype(np.float32)}
    model = block_graph("first", "projected")
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    if kind == "causal":
        mha.attribute.append(helper.make_attribute("unidirectional", 1))
    elif kind == "reshape":
        shape = next(t for t in model.graph.initializer if t.name == "same_shape")
        shape.CopyFrom(numpy_helper.from_array(np.array([-1, 5, HIDDEN], np.int64), "same_shape"))
    else:
        mha.input[4] = "key_padding_mask"
        model.graph.input.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32,
                                                               ["batch", "sequence"]))
        feeds["key_padding_mask"] = np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]], np.int32)
    before, = run(model, feeds)
    assert pool_graph(model.graph)
    after, attended, projected = run(model, feeds, "attended", "projected")
    assert attended.shape == (3, 5, HIDDEN) and projected.shape == (3, 1, HIDDEN)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["mean", "feature"])
def test_a_head_reading_every_position_is_left_as_it_is(head):
    model = block_graph(head)
    unchanged = model.SerializeToString()
    assert not pool_graph(model.graph)
    assert model.SerializeToString() == unchanged
