"""The CPU engine: chosen by measurement at export, run by the scorer without flags, with a logged fallback."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
from structlog.testing import capture_logs

from investment_risk.core.errors import ConfigError, InputError
from investment_risk.export.cpu_engine import FP32_ENGINES, MAE_TOLERANCE, choose_cpu_engine
from investment_risk.modeling import loading
from investment_risk.modeling.description import TWIN_FILES, describe_model

FP32 = {"engine": "onnxruntime", "rows_per_second": 50.0, "val_mae": 1.0}


def test_the_fastest_accurate_engine_wins():
    fast_but_off = {"engine": "openvino-bf16", "rows_per_second": 200.0, "val_mae": 1.0 + MAE_TOLERANCE * 2}
    steady = {"engine": "openvino-f32", "rows_per_second": 60.0, "val_mae": 1.0}
    assert choose_cpu_engine([FP32, fast_but_off, steady])[0] == "openvino-f32"
    close = {**fast_but_off, "val_mae": 1.0 + MAE_TOLERANCE / 2}
    engine, why = choose_cpu_engine([FP32, close, steady])
    assert engine == "openvino-bf16" and "within 0.02" in why


def test_without_labels_only_fp32_engines_may_win():
    unlabelled = [{k: v for k, v in m.items() if k != "val_mae"}
                  for m in (FP32, {"engine": "openvino-bf16", "rows_per_second": 500.0})]
    assert choose_cpu_engine(unlabelled)[0] == "onnxruntime"


def test_a_named_engine_must_have_run():
    measured = [FP32, {"engine": "openvino-bf16", "skipped": "this CPU has no native bf16 units"}]
    assert choose_cpu_engine(measured, "onnxruntime") == ("onnxruntime", "named by --cpu-engine")
    with pytest.raises(ConfigError, match="no native bf16 units"):
        choose_cpu_engine(measured, "openvino-bf16")


def test_export_records_every_engine_and_the_scorer_runs_the_choice(exported, monkeypatch):
    _, model, info = exported
    recorded = info["cpu_engine"]
    assert {m["engine"] for m in recorded["measured"]} == set(loading.CPU_ENGINES)
    assert recorded["engine"] in loading.CPU_ENGINES and recorded["rows"] > 0
    description = describe_model(model)
    assert description.cpu_engine == recorded["engine"]
    runner = loading.load_runner(description, "onnx", "cpu")
    assert runner.provider == PROVIDERS[recorded["engine"]] or runner.provider.startswith(PROVIDERS[recorded["engine"]])
    # An int8 twin ships only where it is the engine the scorer runs.
    for engine, twin in TWIN_FILES.items():
        assert ((model / twin).exists() and twin in info["sha256"]) == (recorded["engine"] == engine), engine
        if recorded["engine"] != engine and loading.cpu_engine_usable(engine)[0]:  # named, it says what is missing
            with pytest.raises(InputError, match=f"no {twin} for the {engine} engine"):
                loading.load_runner(description, "onnx", "cpu", cpu_engine=engine)


PROVIDERS = {"onnxruntime": "CPUExecutionProvider", "onnxruntime-int8": "CPUExecutionProvider-int8",
             "openvino-int8": "openvino-cpu-int8", "openvino-bf16": "openvino-cpu-bf16", "openvino-f32": "openvino-cpu-f32"}


def int8_ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} & {
        "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul"}


@pytest.mark.parametrize("engine", list(TWIN_FILES))
def test_a_named_int8_engine_ships_its_graph_and_scores_close_to_fp32(exported, tmp_path, engine):
    from investment_risk.export.onnx_export import export_run
    from investment_risk.modeling.predict import predict

    if not loading.cpu_engine_usable(engine)[0]:
        pytest.skip(loading.cpu_engine_usable(engine)[1])
    run, fp32_model, _ = exported
    info = export_run(run, tmp_path / "model", cpu_engine=engine)
    model, twin = tmp_path / "model", TWIN_FILES[engine]
    assert info["cpu_engine"]["engine"] == engine and twin in info["sha256"] and int8_ops(model / twin)
    assert not int8_ops(model / "model.onnx")  # the fp32 graph stays beside it, for GPUs and the fallback
    assert [n for n in TWIN_FILES.values() if (model / n).exists()] == [twin]
    int8 = loading.load_runner(describe_model(model), "onnx", "cpu")
    assert int8.provider.startswith(PROVIDERS[engine])
    fp32 = loading.load_runner(describe_model(fp32_model), "onnx", "cpu", cpu_engine="onnxruntime")
    rows, _ = parity_rows_of(model)
    pad = describe_model(model).pad_token_id
    got, want = predict(int8, rows, pad, batch_size=8), predict(fp32, rows, pad, batch_size=8)
    assert np.abs(got - want).mean() < 0.5 and not np.allclose(got, want)  # quantised, and still the same model
    (model / twin).write_bytes((model / twin).read_bytes() + b"\0")
    with pytest.raises(InputError, match=f"{twin} not as model.json's sha256 records"):
        describe_model(model)


def test_without_labels_no_int8_candidate_is_made(exported, tmp_path, monkeypatch):
    from investment_risk.export import onnx_export

    run, _, _ = exported
    monkeypatch.setattr(onnx_export, "measurement_rows", lambda tokenizer, metadata: ([], None))
    info = onnx_export.export_run(run, tmp_path / "model")
    skipped = {m["engine"]: m.get("skipped") for m in info["cpu_engine"]["measured"]}
    assert skipped["openvino-int8"] == skipped["onnxruntime-int8"] == "no validation labels to bound its error"
    assert info["cpu_engine"]["engine"] in FP32_ENGINES
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(tuple(TWIN_FILES.values()))]

def test_a_named_engine_is_measured_alone_beside_the_fp32_reference(exported, tmp_path, monkeypatch):
    from investment_risk.export import onnx_export, static_int8

    run, _, _ = exported

    def no_int8(*args, **kwargs):
        raise AssertionError("an int8 twin was made for an export that named another engine")

    monkeypatch.setattr(static_int8, "quantize_int8", no_int8)
    monkeypatch.setattr(onnx_export, "quantize_dynamic_int8", no_int8)
    info = onnx_export.export_run(run, tmp_path / "model", cpu_engine="openvino-f32")
    measured = {m["engine"]: m for m in info["cpu_engine"]["measured"]}
    assert info["cpu_engine"]["engine"] == "openvino-f32"
    assert {e for e, m in measured.items() if "rows_per_second" in m} == {"onnxruntime", "openvino-f32"}
    assert measured["openvino-f32"]["max_abs_diff"] < 1e-3 and "val_mae" in measured["openvino-f32"]
    assert [measured[e]["skipped"] for e in ("onnxruntime-int8", "openvino-int8", "openvino-bf16")] == [
        "not measured: --cpu-engine named openvino-f32"] * 3


def parity_rows_of(model):
    from investment_risk.export.onnx_export import parity_rows
    from investment_risk.modeling.presets import load_tokenizer

    from investment_risk.modeling.loading import run_splits

    run = describe_model(model).source_run
    meta = json.loads((run / "training_metadata.json").read_text())
    return parity_rows(load_tokenizer(model), {**meta, "splits": run_splits(run, meta)})


def test_an_engine_that_cannot_run_here_falls_back_with_a_warning(exported, tmp_path, monkeypatch):
    import shutil
    _, model, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["cpu_engine"]["engine"] = "openvino-bf16"
    (copy / "model.json").write_text(json.dumps(meta))
    monkeypatch.setattr(loading, "cpu_engine_usable", lambda engine: (engine == "onnxruntime", "no bf16 units here"))
    with capture_logs() as logs:
        runner = loading.load_runner(describe_model(copy), "onnx", "cpu")
    assert runner.provider == "CPUExecutionProvider"
    assert [e for e in logs if e["event"] == "cpu_engine_fallback"][0]["reason"] == "no bf16 units here"
    with pytest.raises(ConfigError, match="--cpu-engine openvino-bf16: cannot run here"):
        loading.load_runner(describe_model(copy), "onnx", "cpu", cpu_engine="openvino-bf16")


def test_a_cpus_profile_is_its_model_its_engine_units_and_its_cores(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                       "flags\t\t: fpu sse2 avx2 avx_vnni avx512f avx512_vnni amx_tile amx_int8 amx_bf16 avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu\n")
    profile = loading.cpu_profile(cpuinfo)
    assert profile["model"] == "Intel(R) Xeon(R) Platinum 8481C" and profile["arch"] == platform.machine()
    assert profile["features"] == ["avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    assert profile["cores"] >= 1
    assert loading.cpu_profile(tmp_path / "absent")["features"] == []


def test_an_engine_measured_on_a_cpu_with_other_units_is_used_and_said_so(exported, tmp_path, monkeypatch):
    import shutil
    _, model, _ = exported
    assert json.loads((model / "model.json").read_text())["cpu_engine"]["measured_on"] == loading.cpu_profile()
    with capture_logs() as logs:
        loading.load_runner(describe_model(model), "onnx", "cpu")
    assert not [e for e in logs if e["event"] == "cpu_engine_measured_elsewhere"]  # measured on this very CPU
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    meta = json.loads((copy / "model.json").read_text())
    epyc = {"arch": "x86_64", "model": "AMD EPYC", "features": ["avx2"], "cores": 2}
    xeon = {"arch": "x86_64", "model": "Intel(R) Xeon(R) Platinum 8481C", "features": ["avx2", "avx512f", "amx_int8"],
            "cores": 2}
    graviton = {"arch": "aarch64", "model": "unknown", "features": [], "cores": 2}  # no x86 flags, no model name
    for here, measured_on, warns in ((epyc, xeon, True), (epyc, {**epyc, "model": "AMD EPYC 9R14", "cores": 8}, False),
                                     (graviton, {**graviton, "arch": "x86_64"}, True), (graviton, graviton, False)):
        monkeypatch.setattr(loading, "cpu_profile", lambda here=here: here)
        meta["cpu_engine"]["measured_on"] = measured_on
        (copy / "model.json").write_text(json.dumps(meta))
        with capture_logs() as logs:
            runner = loading.load_runner(describe_model(copy), "onnx", "cpu")
            loading.load_runner(describe_model(copy), "onnx", "cpu", cpu_engine="onnxruntime")  # named: no warning
        warned = [e for e in logs if e["event"] == "cpu_engine_measured_elsewhere"]
        assert len(warned) == warns, measured_on  # the units and the architecture count, not the model or cores
        assert not warns or (warned[0]["measured_on"], warned[0]["here"]) == (measured_on, here)
        assert runner.provider  # the model's choice still runs


def test_a_cuda_provider_without_a_gpu_scores_on_the_cpu_and_says_so(exported, monkeypatch):
    import onnxruntime as ort

    _, model, _ = exported
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    monkeypatch.setattr(loading, "gpu_visible", lambda: False)
    with capture_logs() as logs:
        runner = loading.load_runner(describe_model(model), "onnx", "auto", cpu_engine="onnxruntime")
    assert runner.provider == "CPUExecutionProvider"
    assert [e["used"] for e in logs if e["event"] == "cuda_unavailable"] == ["CPU"]


@pytest.mark.skipif(not loading.cpu_engine_usable("openvino-f32")[0], reason="openvino is not installed")
def test_openvino_spreads_each_batch_over_its_streams_in_row_order(exported):
    from investment_risk.modeling.onnx_runtime import usable_cpus
    from investment_risk.modeling.predict import predict

    _, model, _ = exported
    streamed = loading.cpu_runner(model / "model.onnx", "openvino-f32")
    latency = loading.cpu_runner(model / "model.onnx", "openvino-f32", streams=1)
    assert latency.streams == 1 and (streamed.streams > 1 or usable_cpus() == 1)
    rows, _ = parity_rows_of(model)
    pad = describe_model(model).pad_token_id
    for batch_size in (1, 3, 8):  # fewer rows than streams, uneven slices, even ones
        np.testing.assert_allclose(predict(streamed, rows, pad, batch_size=batch_size),
                                   predict(latency, rows, pad, batch_size=batch_size), atol=1e-5)


@pytest.mark.parametrize("files, quota_cpus", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2 threads
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_threads_follow_the_cgroup_cpu_quota(tmp_path, files, quota_cpus):
    """A pod with a CPU limit and no cpuset sees every node core; its engines get threads for its quota only."""
    import os

    from investment_risk.modeling.onnx_runtime import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (affinity if quota_cpus is None else min(affinity, quota_cpus))


def test_available_memory_is_the_tighter_of_the_machine_and_the_cgroup(tmp_path):
    from investment_risk.export.static_int8 import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    v2, v1, unlimited, none = (tmp_path / name for name in ("v2", "v1", "unlimited", "none"))
    (v1 / "memory").mkdir(parents=True)
    (unlimited / "memory").mkdir(parents=True)
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    (v2 / "memory.current").write_text("1073741824\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("4294967296\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("294967296\n")
    (unlimited / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (unlimited / "memory" / "memory.usage_in_bytes").write_text("1\n")
    assert available_memory(v2, meminfo) == 7 * 2**30
    assert available_memory(v1, meminfo) == 4 * 10**9
    assert available_memory(unlimited, meminfo) == available_memory(none, meminfo) == 20000000 * 1024
    assert available_memory(none, tmp_path / "missing") is None


def test_no_int8_twin_is_attempted_without_the_memory_nncf_needs(exported, tmp_path, monkeypatch):
    # A Qwen2.5-1.5B-shaped export was killed for memory inside NNCF on a 24 GiB machine.
    from investment_risk.export import onnx_export, static_int8

    run, _, _ = exported
    monkeypatch.setattr(static_int8, "available_memory", lambda: 2**20)
    info = onnx_export.export_run(run, tmp_path / "model")
    skipped = {m["engine"]: m.get("skipped", "") for m in info["cpu_engine"]["measured"]}
    for engine, who in (("openvino-int8", "NNCF"), ("onnxruntime-int8", "ONNX Runtime's quantiser")):
        assert skipped[engine].startswith(f"{who} would need about") and "0.0 GiB are available" in skipped[
            engine], skipped
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(tuple(TWIN_FILES.values()))]
    with pytest.raises(ConfigError, match="--cpu-engine onnxruntime-int8: cannot run here \\(ONNX Runtime's"):
        onnx_export.export_run(run, tmp_path / "named", cpu_engine="onnxruntime-int8")


def test_the_export_measures_onnx_runtime_as_the_scorer_runs_it(exported, monkeypatch):
    """One ONNX Runtime runner: the export's measurement gets the scorer's threads (the pod's CPU quota, not every
    core of the node) and its sequential, single inter-op pool."""
    from investment_risk.modeling import onnx_runtime

    _, model, _ = exported
    monkeypatch.setattr(onnx_runtime, "usable_cpus", lambda: 1)
    measured = loading.cpu_runner(model / "model.onnx", "onnxruntime").session.get_session_options()
    scoring = loading.load_runner(describe_model(model), "onnx", "cpu", None, "onnxruntime").session
    for options in (measured, scoring.get_session_options()):
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_nncf_writes_nothing_to_stdout():
    # NNCF's own handler printed a line per unquantised node on stdout, between the JSON events of `export`.
    import logging
    import sys

    import nncf  # noqa: F401  (its import installs the handler)

    from investment_risk.export.static_int8 import _quiet_nncf

    _quiet_nncf()
    logger = logging.getLogger("nncf")
    assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    streams = [h.stream for h in logger.handlers if type(h) is logging.StreamHandler]  # NNCF's own
    assert streams and all(stream is sys.__stderr__ for stream in streams)


def test_the_int8_quantiser_stages_its_copy_of_the_graph_beside_the_output(exported, tmp_path, monkeypatch):
    # ONNX Runtime's quantiser saves the whole fp32 graph in a temporary folder: in /tmp, a pod's memory-backed 4Gi,
    # a Qwen2.5-1.5B export's 6.2 GB got the pod evicted. Beside the output instead, removed after.
    import shutil
    import tempfile

    from investment_risk.export.graph_passes import quantize_dynamic_int8

    _, model, _ = exported
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(model / "model.onnx", work / "model.onnx")
    staged = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        staged.append(tempfile.gettempdir())
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    before = tempfile.tempdir
    quantize_dynamic_int8(work / "model.onnx", work / "model.int8.onnx", external=False)
    assert staged and all(path.startswith(str(work) + "/") for path in staged), staged
    assert sorted(p.name for p in work.iterdir()) == ["model.int8.onnx", "model.onnx"] and tempfile.tempdir == before
