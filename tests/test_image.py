"""The built image, run as the pods run it (`make image-test`; needs `make image` and a container engine).

Every container here runs with a read-only root, as user 10001, with no capabilities, no privilege escalation and
no network, a tmpfs /tmp, a /cache volume and the data and model directories where the manifests mount the PVCs,
with the ConfigMap's environment. Any write that assumed a writable home or root fails the step that made it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from investment_risk.cli.app import main
from investment_risk.core.spec import DIMENSIONS
from investment_risk.modeling.description import describe_model

pytestmark = pytest.mark.image
IMAGE = os.environ.get("IMAGE", "ghcr.io/investment-risk/investment-risk:0.1.0")
ROOT = Path(__file__).resolve().parents[1]
POD_USER = 10001


def render(*args: str) -> str:
    result = CliRunner().invoke(main, ["jobs", "render", *args, "--image", IMAGE])
    assert result.exit_code == 0, result.output
    return result.output


def configmap_env() -> dict[str, str]:
    docs = [d for d in yaml.safe_load_all(render("shared", "--profile", "cpu")) if d]
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    if shutil.which("docker") is None or subprocess.run(["docker", "image", "inspect", IMAGE],
                                                        capture_output=True).returncode:
        pytest.fail(f"image {IMAGE} is not built: run `make image` first")
    root = tmp_path_factory.mktemp("pods")
    dirs = {name: root / name for name in ("data", "models", "cache")}
    for path in dirs.values():
        path.mkdir()
        os.chown(path, POD_USER, POD_USER)  # as fsGroup makes a PVC writable for the pod
    return dirs


def pod(volumes: dict[str, Path], *args: str, entrypoint: str | None = None,
        container_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One container as the pod spec runs it (`container_env`: the container's own env, over the ConfigMap's)."""
    env = {**configmap_env(), **(container_env or {})}
    command = ["docker", "run", "--rm", "--read-only", "--user", f"{POD_USER}:{POD_USER}", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--network", "none", "--tmpfs", "/tmp:mode=1777",
               "--mount", f"type=bind,source={volumes['cache']},target=/cache",
               "--mount", f"type=bind,source={volumes['data']},target=/data",
               "--mount", f"type=bind,source={volumes['models']},target=/models",
               *[a for key in env for a in ("--env", key)],
               *(["--entrypoint", entrypoint] if entrypoint else []), IMAGE, *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)


def ok(done: subprocess.CompletedProcess) -> list[dict]:
    """The step succeeded and its stdout is JSON log lines only; the events it logged."""
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipeline(volumes):
    """synth -> split -> train (tiny-qwen2 and minilm) -> export -> score -> score-merge -> evaluate, in containers."""
    steps = {
        "synth": ["data", "synth", "--rows", "240", "--seed", "3", "--out", "/data/articles.parquet"],
        "split": ["data", "split", "--input", "/data/articles.parquet", "--out", "/data/splits"],
        "synth_batch": ["data", "synth", "--rows", "90", "--seed", "4", "--out", "/data/incoming/batch.parquet"],
    }
    for base in ("tiny-qwen2", "minilm"):
        steps[f"train_{base}"] = ["train", "--base-model", base, "--data", "/data/splits", "--out", f"/models/runs/{base}",
                                  "--epochs", "1", "--batch-size", "8", "--max-length", "64", "--device", "cpu"]
        steps[f"export_{base}"] = ["export", "--run", f"/models/runs/{base}", "--out", f"/models/{base}"]
    # The GPU path's graph (onnxruntime-genai-cuda's model builder, in a subprocess of the pod), proved on the CPU.
    steps["export_fp16"] = ["export", "--run", "/models/runs/tiny-qwen2", "--out", "/models/tiny-qwen2-fp16",
                            "--dtype", "fp16"]
    steps["score"] = ["score", "--model", "/models/tiny-qwen2", "--input", "/data/incoming", "--out", "/data/scored/one"]
    steps["merge"] = ["score-merge", "--out", "/data/scored/one"]
    steps["evaluate"] = ["evaluate", "--model", "/models/tiny-qwen2", "--data", "/data/splits/test.parquet",
                         "--out", "/data/evaluation.json"]
    steps["render"] = ["jobs", "render", "score", "--profile", "cpu", "--shards", "3"]
    return {name: pod(volumes, *args) for name, args in steps.items()}


def test_the_pod_runs_as_10001_and_cannot_write_its_root(volumes):
    done = pod(volumes, "-c", "import os, pathlib\n"
               "print(os.getuid(), os.getgid())\n"
               "for path in ('/opt/venv/x', '/x', '/nonexistent/x'):\n"
               "    try:\n        pathlib.Path(path).write_text('x'); print('wrote', path)\n"
               "    except OSError as exc:\n        print('refused', path, exc.errno)\n"
               "for path in ('/tmp/x', '/cache/x', '/data/x'):\n"
               "    pathlib.Path(path).write_text('x'); print('wrote', path)\n", entrypoint="python3")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0] == f"{POD_USER} {POD_USER}"
    assert [line.split()[0] for line in lines[1:4]] == ["refused"] * 3  # read-only root (EROFS), no home
    assert lines[4:] == ["wrote /tmp/x", "wrote /cache/x", "wrote /data/x"]
    (volumes["data"] / "x").unlink()


def test_the_image_holds_one_python_and_only_the_compilers_torch_compile_needs(volumes):
    done = pod(volumes, "-c", "ls /usr/bin | grep -E '^(gcc|g\\+\\+|make|git|pip3?)$'; ls /opt/venv/bin/pip* /src "
               "/root/.cache 2>/dev/null; ls /usr/bin | grep -E '^python3\\.[0-9]+$'; ls /usr/include/python3.13/Python.h",
               entrypoint="sh")
    assert done.stdout.split() == ["g++", "gcc", "python3.13", "/usr/include/python3.13/Python.h"], done.stdout


def test_a_relative_output_path_is_written_in_the_pods_working_directory(volumes):
    # demo's default --out is the relative demo-output: under a read-only root the working directory must be writable
    done = pod(volumes, "-c", "investment-risk data synth --rows 5 --out relative.parquet >/dev/null && pwd && "
               "ls /tmp/relative.parquet", entrypoint="sh")
    assert done.returncode == 0 and done.stdout.split() == ["/tmp", "/tmp/relative.parquet"], done.stderr[-2000:]


def test_train_compile_runs_in_the_pod(pipeline, volumes):
    # torch.compile builds its kernels with a C/C++ compiler and Python's headers (Inductor's CPU kernels here,
    # Triton's CUDA driver stub on a GPU): without them `--extra-arg --compile` failed with a traceback, exit 1,
    # which the Job retried. The train container's env keeps the kernels on /models for the next pod.
    [job] = [d for d in yaml.safe_load_all(render("train", "--profile", "cpu")) if d]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    done = pod(volumes, "train", "--base-model", "tiny-qwen2", "--data", "/data/splits", "--out",
               "/models/runs/compiled", "--epochs", "1", "--batch-size", "8", "--max-length", "64", "--device", "cpu",
               "--compile", container_env={k: v for k, v in env.items() if k.endswith("CACHE_DIR")})
    events = ok(done)
    assert "training_done" in [e["event"] for e in events], events[-3:]
    assert any((volumes["models"] / "compile-cache").rglob("*.so"))


def test_the_pod_has_a_ca_store_to_verify_the_hubs_tls(volumes):
    done = pod(volumes, "-c", "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])",
               entrypoint="python3")
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr[-2000:]


def test_the_stage_pod_reaches_for_the_hub_only_when_told_to(volumes):
    # The stage Job's container lifts the ConfigMap's HF_HUB_OFFLINE; this pod has no network, so the hub cannot be
    # reached: exit 1, which the Job retries. Every other pod keeps the ConfigMap's offline mode: exit 2.
    done = pod(volumes, "stage-model", "--base-model", "qwen2.5-1.5b", container_env={"HF_HUB_OFFLINE": "0"})
    assert done.returncode == 1 and "could not download Qwen/Qwen2.5-1.5B" in done.stderr, done.stderr[-2000:]
    offline = pod(volumes, "stage-model")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr, offline.stderr[-2000:]


def test_every_step_runs_in_the_pod_and_logs_json(pipeline):
    for name, done in pipeline.items():
        if name != "render":
            assert ok(done), name
    render = [d for d in yaml.safe_load_all(pipeline["render"].stdout) if d]
    assert render[0]["kind"] == "Job" and render[0]["spec"]["completions"] == 3


def test_outputs_are_whole_and_the_row_invariant_holds(pipeline, volumes):
    data, models = volumes["data"], volumes["models"]
    for base in ("tiny-qwen2", "minilm"):
        model = describe_model(models / base)  # checks every ONNX file against the sha256 in model.json
        assert model.exported and (models / "runs" / base / "training_metadata.json").exists()
    fp16 = json.loads((models / "tiny-qwen2-fp16" / "model.json").read_text())
    assert fp16["fused_operators"]["GroupQueryAttention"] == 2 and fp16["exporter"]["model_builder"].startswith(
        "onnxruntime-genai-cuda")
    metrics = json.loads((data / "scored" / "one" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["rows_in"] == 90
    scored = pa.concat_tables([pq.read_table(p) for p in (data / "scored" / "one").glob("part-*.parquet")])
    assert metrics["rows_in"] == scored.num_rows + metrics["rows_rejected"] + metrics.get("blank_lines", 0)
    assert not list(data.rglob("*.tmp*")) and not list(models.rglob("*.tmp*"))  # nothing left half-written
    evaluation = json.loads((data / "evaluation.json").read_text())
    assert set(DIMENSIONS) <= set(evaluation["per_dimension"])


def test_without_a_gpu_the_scorer_uses_the_cpu_and_says_so(pipeline):
    events = ok(pipeline["score"])
    fallback = [e for e in events if e["event"] == "cuda_unavailable"]
    assert fallback and fallback[0]["used"] == "CPU", [e["event"] for e in events]


def test_run_local_in_containers_matches_one_score_run(pipeline, volumes, tmp_path):
    data, models = volumes["data"], volumes["models"]
    manifest = tmp_path / "score.yaml"
    manifest.write_text(render("score", "--with-shared", "--profile", "cpu", "--name", "rl", "--shards", "3",
                               "--model", "/models/tiny-qwen2", "--input", "/data/incoming",
                               "--out", "/data/scored/$(JOB_NAME)"))
    result = CliRunner().invoke(main, ["jobs", "run-local", "--runtime", "docker", "--manifest", str(manifest),
                                       "--mount", f"/data={data}", "--mount", f"/models={models}"])
    assert result.exit_code == 0, result.output
    out = data / "scored" / "rl"
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["part-00000", "part-00001", "part-00002"]
    merge = tmp_path / "merge.yaml"
    merge.write_text(render("merge", "--with-shared", "--profile", "cpu", "--name", "rl-merge", "--shards", "3",
                            "--out", "/data/scored/rl"))
    result = CliRunner().invoke(main, ["jobs", "run-local", "--runtime", "docker", "--manifest", str(merge),
                                       "--mount", f"/data={data}", "--mount", f"/models={models}"])
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "metrics.json").read_text())
    assert merged["complete"] and merged["shards"] == 3 and merged["rows_in"] == 90

    def rows(directory: Path) -> pa.Table:
        return pa.concat_tables([pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))]).sort_by("id")

    local, alone = rows(out), rows(data / "scored" / "one")
    assert local.column("id").to_pylist() == alone.column("id").to_pylist()
    assert local.column("signal_tier").to_pylist() == alone.column("signal_tier").to_pylist()
    for dim in DIMENSIONS:
        np.testing.assert_allclose(local.column(dim).to_numpy(zero_copy_only=False),
                                   alone.column(dim).to_numpy(zero_copy_only=False), atol=1e-5)


def test_the_cpu_overlays_night_runs_to_completion_in_containers(pipeline, volumes, tmp_path):
    """The nightly CronJob as the CPU overlay applies it, run as the Job it creates (`--job` names the CronJob)."""
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "cpu")],
                              capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    cron = next(d for d in docs if d["kind"] == "CronJob")
    job = cron["spec"]["jobTemplate"]
    (tmp_path / "overlay.yaml").write_text(rendered)
    shutil.copytree(volumes["models"] / "tiny-qwen2", volumes["models"] / "current", dirs_exist_ok=True)
    result = CliRunner().invoke(main, ["jobs", "run-local", "--runtime", "docker", "--image", IMAGE,
                                       "--manifest", str(tmp_path / "overlay.yaml"), "--job", cron["metadata"]["name"],
                                       "--mount", f"/data={volumes['data']}", "--mount", f"/models={volumes['models']}"])
    assert result.exit_code == 0, result.output
    out_arg = job["spec"]["template"]["spec"]["containers"][0]["args"]
    out_path = out_arg[out_arg.index("--out") + 1].replace("$(JOB_NAME)", cron["metadata"]["name"])
    out = volumes["data"] / out_path.removeprefix("/data/")
    assert len(list((out / "_done").iterdir())) == job["spec"]["completions"] == 2
