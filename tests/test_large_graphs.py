"""Graphs over protobuf's 2 GB limit, as a Qwen2.5-1.5B export is (6 GB of fp32 weights in model.onnx.data).

Slow and disk-hungry (2-3 GB a test, removed after it): `make test-large` runs them, `make test` leaves them out.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.large

ROWS, COLUMNS = 4096, 140_000  # 2.29 GB of fp32 weights


@pytest.fixture
def work(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps the last runs' folders, gigabytes each here."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def external_tensor(name: str, array: np.ndarray, data: Path):
    """An fp32 initializer whose bytes are written to `data` and only referenced from the graph."""
    from onnx import TensorProto

    data.write_bytes(array.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def write_large_graph(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x @ w with w kept in model.onnx.data, written straight to disk (no ModelProto over 2 GB is ever built)."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.random.default_rng(0).standard_normal((ROWS, COLUMNS), dtype=np.float32) * 0.01
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "large",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLUMNS])],
                              [external_tensor("w", weights, path.parent / "model.onnx.data")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    x = np.random.default_rng(1).standard_normal((1, ROWS), dtype=np.float32)
    return x, x @ weights


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_graph_over_2_gb_is_fused_and_converted(work, dtype):
    import onnxruntime as ort

    from investment_risk.export.graph_passes import fuse_graph, to_fp16, to_int8

    path = work / "model.onnx"
    x, want = write_large_graph(path)
    # as export fuses before int8: keeping the graph before attention packing, which moves back when nothing packed
    fuse_graph(path, external=True, unpacked=work / "unpacked" if dtype == "int8" else None)
    (to_fp16 if dtype == "fp16" else to_int8)(path, external=True)
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "model.onnx.data"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.05 * np.abs(want).max()


def write_large_scorer(path: Path) -> None:
    """input_ids, attention_mask -> scores (rows, 8) through a 2.29 GB embedding kept in model.onnx.data: the shape
    of an exported scorer, for the static int8 twin's calibration."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((COLUMNS, ROWS), dtype=np.float32) * 0.01  # vocabulary x hidden
    embedding = external_tensor("embedding", table, path.parent / "model.onnx.data")
    head = numpy_helper.from_array(rng.standard_normal((ROWS, 8), dtype=np.float32), "head")
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["hidden"]),
             helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
             helper.make_node("Mul", ["hidden", "mask3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "head"], ["per_token"]),
             helper.make_node("ReduceMean", ["per_token", "sequence"], ["scores"], keepdims=0)]
    graph = helper.make_graph(nodes, "large_scorer",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
                               for n in ("input_ids", "attention_mask")],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 8])],
                              [embedding, head, numpy_helper.from_array(np.array([2]), "last"),
                               numpy_helper.from_array(np.array([1]), "sequence")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


def test_the_static_int8_twin_of_a_graph_over_2_gb(work):
    import onnxruntime as ort

    from investment_risk.modeling.predict import padded_batches
    from investment_risk.export.static_int8 import int8_unavailable_reason, quantize_int8
    from investment_risk.modeling.description import INT8_FILE

    if int8_unavailable_reason():
        pytest.skip(int8_unavailable_reason())
    path = work / "model.onnx"
    write_large_scorer(path)
    rows = [np.random.default_rng(i).integers(0, COLUMNS, 20 + 3 * i) for i in range(16)]
    out = quantize_int8(path, path.with_name(INT8_FILE), rows, pad_id=0, external=True)
    assert out.name == INT8_FILE and (work / f"{INT8_FILE}.data").exists()
    batch = next(padded_batches(rows, 0, [np.arange(4)]))
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0] for p in (path, out))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() and not np.array_equal(got, want)


def test_every_cpu_engine_reads_a_graph_over_2_gb(work):
    # export measures each CPU engine on the fp32 graph, and the scorer runs the chosen one from the same files.
    from investment_risk.export.graph_passes import quantize_dynamic_int8
    from investment_risk.modeling.description import DYNAMIC_INT8_FILE
    from investment_risk.modeling.loading import CPU_ENGINES, cpu_engine_usable, cpu_runner
    from investment_risk.modeling.predict import predict

    path = work / "model.onnx"
    write_large_scorer(path)
    quantize_dynamic_int8(path, path.with_name(DYNAMIC_INT8_FILE), external=True)  # onnxruntime-int8's twin
    assert (work / f"{DYNAMIC_INT8_FILE}.data").exists()
    rows = [np.random.default_rng(i).integers(0, COLUMNS, 20 + 3 * i) for i in range(6)]
    scores = {engine: predict(cpu_runner(path, engine), rows, 0, batch_size=4)
              for engine in CPU_ENGINES if engine != "openvino-int8" and cpu_engine_usable(engine)[0]}
    assert "onnxruntime-int8" in scores
    assert len(scores) >= 2, scores.keys()
    for engine, got in scores.items():
        assert np.abs(got - scores["onnxruntime"]).max() < 0.05 * np.abs(scores["onnxruntime"]).max(), engine
