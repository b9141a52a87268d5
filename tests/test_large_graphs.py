"""Graphs over protobuf's 2 GB limit, as a Qwen2.5-1.5B export is (6 GB of fp32 weights in model.onnx.data).

Slow and disk-hungry (about 6 GB written): `make test-large` runs them, `make test` leaves them out.
"""

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.large

ROWS, COLUMNS = 4096, 140_000  # 2.29 GB of fp32 weights


def write_large_graph(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x @ w with w kept in model.onnx.data, written straight to disk (no ModelProto over 2 GB is ever built)."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.random.default_rng(0).standard_normal((ROWS, COLUMNS), dtype=np.float32) * 0.01
    (path.parent / "model.onnx.data").write_bytes(weights.tobytes())
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[ROWS, COLUMNS], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(weights.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "large",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLUMNS])], [tensor])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = np.random.default_rng(1).standard_normal((1, ROWS), dtype=np.float32)
    return x, x @ weights


def test_a_graph_over_2_gb_is_fused_and_converted_to_fp16(tmp_path):
    import onnxruntime as ort

    from investment_risk.export.onnx_export import fuse_graph, to_fp16

    path = tmp_path / "model.onnx"
    x, want = write_large_graph(path)
    fuse_graph(path, external=True)
    to_fp16(path, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()
