"""The fp16 conversion yields a graph ONNX Runtime loads, whichever onnxruntime version's converter wrote it."""

import numpy as np
import pytest


def write_shared_input_graph(path):
    """x + c feeds two operators kept in fp32 (Sqrt, Exp): each needs the fp16 value cast back to fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["x", "c"], ["v"], name="add"),
             helper.make_node("Sqrt", ["v"], ["s"], name="sqrt"),
             helper.make_node("Exp", ["v"], ["e"], name="exp"),
             helper.make_node("Add", ["s", "e"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.full((2, 3), 1.5, dtype=np.float32), "c")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


def one_cast_per_consumer(convert):
    """What onnxruntime 1.31's converter (the image's onnxruntime-gpu) writes: the shared Cast repeated for each
    consumer, same name, same output."""
    def converter(*args, **kwargs):
        model = convert(*args, **kwargs)
        for node in [n for n in model.graph.node if n.name.endswith("_cast_to_fp32_node")]:
            model.graph.node.append(node)
            info = next(i for i in model.graph.value_info if i.name == node.output[0])
            model.graph.value_info.append(info)
        return model
    return converter


@pytest.mark.parametrize("converter", ["installed", "onnxruntime 1.31"])
def test_a_value_kept_in_fp32_for_two_consumers_converts_to_a_loadable_graph(tmp_path, monkeypatch, converter):
    import onnx
    import onnxruntime as ort
    import onnxruntime.transformers.float16 as float16

    from investment_risk.export.graph_passes import to_fp16

    if converter != "installed":
        monkeypatch.setattr(float16, "convert_float_to_float16", one_cast_per_consumer(float16.convert_float_to_float16))
    path = tmp_path / "model.onnx"
    write_shared_input_graph(path)
    to_fp16(path, external=False)
    model = onnx.load(str(path))
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    assert sum(n.op_type == "Cast" and n.input[0] == "v" for n in model.graph.node) == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = np.sqrt(x + 1.5) + np.exp(x + 1.5)
    np.testing.assert_allclose(got, want, rtol=2e-3)
