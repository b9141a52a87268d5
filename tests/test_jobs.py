import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.core.errors import ConfigError
from investment_risk.k8s.manifests import SCORE_GRACE_S, JobSettings, build, default_base, to_yaml
from investment_risk.scoring.pipeline import ScoreConfig, score
from investment_risk.core.spec import DIMENSIONS
from investment_risk.datasets.synth import SynthConfig, generate

from .conftest import assert_json_stdout
from .k8s_fake import WAITING, FakeCluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NS = "investment-risk"


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def kustomize(path: Path) -> str:
    done = run(["kubectl", "kustomize", path])
    assert done.returncode == 0, done.stderr
    return done.stdout


def validate(text: str, tmp_path: Path) -> None:
    path = tmp_path / f"manifests-{abs(hash(text))}.yaml"
    path.write_text(text)
    done = run([BIN / "kubernetes-validate", "--strict", "-k", "1.33.0", path])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        if d["kind"] == "Job":
            out[d["metadata"]["name"]] = d["spec"]
        elif d["kind"] == "CronJob":
            out[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]
    return out


# --- manifests ---------------------------------------------------------------------------------------------------

def test_base_files_are_the_builders_output():
    for name, docs in default_base().items():
        committed = (ROOT / "k8s" / "base" / name).read_text()
        assert committed.split("\n", 1)[1] == to_yaml(docs), f"k8s/base/{name} is stale: run `make k8s`"


@pytest.fixture(scope="module")
def kueue_overlay(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kueue")
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "k8s" / "overlays" / "gpu", root)],
        "components": [os.path.relpath(ROOT / "k8s" / "components" / "kueue", root)]}))
    return root


def test_every_overlay_renders_and_validates_for_1_33(tmp_path, kueue_overlay):
    for path in (ROOT / "k8s" / "base", ROOT / "k8s" / "overlays" / "gpu", ROOT / "k8s" / "overlays" / "cpu", kueue_overlay):
        validate(kustomize(path), tmp_path)


def test_the_nightly_component_starts_the_suspended_cronjob(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "k8s" / "overlays" / "cpu", tmp_path)],
        "components": [os.path.relpath(ROOT / "k8s" / "components" / "nightly", tmp_path)]}))

    def cron(path):
        return next(d for d in docs_of(kustomize(path)) if d["kind"] == "CronJob")["spec"]
    assert cron(ROOT / "k8s" / "overlays" / "cpu")["suspend"] is True
    assert cron(tmp_path)["suspend"] is False


def test_overlays_set_the_hardware_and_apply_no_job(kueue_overlay):
    gpu, cpu = docs_of(kustomize(ROOT / "k8s" / "overlays" / "gpu")), docs_of(kustomize(ROOT / "k8s" / "overlays" / "cpu"))
    queued = docs_of(kustomize(kueue_overlay))
    # A Job's pod template is immutable and Kueue admits a suspended Job with its label: applying holds none.
    assert not [d for docs in (gpu, cpu, queued) for d in docs if d["kind"] == "Job"]
    [gpu_night], [cpu_night] = pod_specs(gpu).values(), pod_specs(cpu).values()
    pod = gpu_night["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and env["INVESTMENT_RISK_DEVICE"] == "cuda"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # The CPU overlay's night is the builder's CPU profile at 2 shards, its image taken from the node: limits that
    # hold the emptyDirs, the device, the shard count, all in step with `jobs submit --profile cpu`.
    expected = build("nightly", JobSettings(profile="cpu", pull_policy="IfNotPresent"), shards=2)
    assert cpu_night == expected["spec"]["jobTemplate"]["spec"]
    assert "nvidia.com/gpu" not in kustomize(ROOT / "k8s" / "overlays" / "cpu")
    [cron] = [d for d in queued if d["kind"] == "CronJob"]
    assert cron["spec"]["jobTemplate"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == NS


def test_the_image_pull_policy_follows_the_reference_unless_named(runner):
    def policy(*args):
        result = runner.invoke(main, ["jobs", "render", "score", "--name", "s", *args])
        assert result.exit_code == 0, result.output
        return docs_of(result.output)[0]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"]
    assert policy() == "Always"  # a tag can be pushed again
    assert policy("--image", "registry.example.com/ir@sha256:" + "a" * 64) == "IfNotPresent"
    assert policy("--image-pull-policy", "IfNotPresent") == "IfNotPresent"  # an image loaded into kind's nodes
    result = runner.invoke(main, ["jobs", "render", "score", "--image-pull-policy", "Sometimes"])
    assert result.exit_code == 2 and "--image-pull-policy" in result.output


def test_the_export_job_writes_the_gpu_graph_on_a_gpu_and_the_measured_cpu_one_on_cpus(runner):
    def container(*args):
        result = runner.invoke(main, ["jobs", "render", "export", "--name", "exp-1", "--run", "/models/runs/r1", *args])
        assert result.exit_code == 0, result.output
        return docs_of(result.output)[0]["spec"]["template"]["spec"]["containers"][0]
    gpu = container("--out", "/models/current", "--extra-arg", "--force")
    assert gpu["args"] == ["export", "--run", "/models/runs/r1", "--out", "/models/current", "--dtype", "fp16",
                           "--device", "cuda", "--force"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # another --dtype replaces the profile's: the CLI refuses an option given twice
    bf16 = container("--out", "/models/current", "--extra-arg", "--dtype", "--extra-arg", "bf16")
    assert bf16["args"][-4:] == ["--device", "cuda", "--dtype", "bf16"] and bf16["args"].count("--dtype") == 1
    cpu = container("--profile", "cpu")
    assert cpu["args"] == ["export", "--run", "/models/runs/r1", "--out", "/models/exports/exp-1"]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    result = runner.invoke(main, ["jobs", "render", "export", "--name", "exp-1"])
    assert result.exit_code == 2 and "export needs --run" in result.output


def test_the_stage_job_alone_reaches_the_hub_and_needs_no_gpu(runner):
    result = runner.invoke(main, ["jobs", "render", "stage", "--name", "stage-1", "--base-model", "Qwen/Qwen2.5-0.5B"])
    assert result.exit_code == 0, result.output
    job = docs_of(result.output)[0]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["stage-model", "--base-model", "Qwen/Qwen2.5-0.5B"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "0" and env["INVESTMENT_RISK_DEVICE"] == "cpu"  # container env beats the ConfigMap
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in pod
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/models", "/var/run/secrets/huggingface"}
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [2]
    for kind, paths in KIND_PATHS.items():  # every other pod stays offline
        result = runner.invoke(main, ["jobs", "render", kind, *paths])
        assert result.exit_code == 0 and "HF_HUB_OFFLINE" not in result.output, result.output


def test_shared_pvcs_take_a_storage_class_and_sizes(runner):
    result = runner.invoke(main, ["jobs", "render", "shared", "--storage-class", "nfs-client", "--data-size", "1Ti",
                                  "--models-size", "50Gi"])
    assert result.exit_code == 0, result.output
    pvcs = {d["metadata"]["name"]: d["spec"] for d in docs_of(result.output) if d["kind"] == "PersistentVolumeClaim"}
    assert {name: (spec["storageClassName"], spec["resources"]["requests"]["storage"], spec["accessModes"])
            for name, spec in pvcs.items()} == {"investment-risk-data": ("nfs-client", "1Ti", ["ReadWriteMany"]),
                                                "investment-risk-models": ("nfs-client", "50Gi", ["ReadWriteMany"])}
    for args, message in [(["--data-size", "lots"], "--data-size 'lots' is not a storage quantity"),
                          (["--storage-class", "Fast_SSD"], "--storage-class 'Fast_SSD' is not a valid")]:
        result = runner.invoke(main, ["jobs", "render", "shared", *args])
        assert result.exit_code == 2 and message in result.output, result.output


# The path options each kind's Job takes, as the pod sees them.
KIND_PATHS = {"train": ("--out", "/models/runs/x"), "export": ("--run", "/models/runs/r"),
              "score": ("--out", "/data/scored/x"), "merge": ("--out", "/data/scored/x"),
              "nightly": ("--out", "/data/scored/$(JOB_NAME)")}


def test_rendered_jobs_validate_for_every_kind_and_profile(tmp_path, runner):
    texts = []
    for kind, paths in {"stage": (), **KIND_PATHS, "shared": (), "all": ()}.items():
        for profile in ("gpu", "cpu"):
            name = () if kind in ("shared", "all") else ("--name", f"{kind}-{profile}")
            result = runner.invoke(main, ["jobs", "render", kind, "--profile", profile, "--queue", "batch", *paths,
                                          *name])
            assert result.exit_code == 0, result.output
            texts.append(result.stdout)
    validate("---\n".join(texts), tmp_path)


def parse_gi(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2])


def every_kind(settings: JobSettings) -> list[dict]:
    return [build(kind, settings, name=f"{kind}-{settings.profile}", run="/models/runs/r",
                  out="/data/scored/$(JOB_NAME)" if kind == "nightly" else "/data/scored/x")
            for kind in ("stage", "train", "export", "score", "merge", "nightly")]


def test_pods_follow_the_restricted_profile_and_failure_policy():
    base = [d for file_docs in default_base().values() for d in file_docs]
    docs = base + every_kind(JobSettings()) + every_kind(JobSettings(profile="cpu"))
    for name, spec in pod_specs(docs).items():
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
        rules = spec["podFailurePolicy"]["rules"]
        # A disrupted pod is retried whatever it exited with: that rule comes first (the first matching rule applies)
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = pod["containers"][0]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"] == {"drop": ["ALL"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        scratch = sum(parse_gi(volumes[mounts[path]]["emptyDir"]["sizeLimit"]) for path in ("/tmp", "/cache"))
        # the emptyDirs count towards the pod's ephemeral storage: each can fill up to its own limit
        assert parse_gi(container["resources"]["limits"]["ephemeral-storage"]) > scratch
        assert volumes["hf-token"]["secret"]["secretName"] == "investment-risk-hf-token"
        # every line a Job's pods log carries its name as run_id (shards, retries); volumes are not re-owned per start
        env = [e["name"] for e in container["env"]]
        assert env.index("INVESTMENT_RISK_RUN_ID") > env.index("JOB_NAME")
        assert container["env"][env.index("INVESTMENT_RISK_RUN_ID")]["value"] == "$(JOB_NAME)"
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    # A CPU export of a 1.5B model needs more memory than a CPU scoring pod has
    assert parse_gi(pod_specs(docs)["export-cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]) >= 16
    # A stopped training pod checkpoints before the SIGKILL: its grace period covers a step and a validation pass
    assert pod_specs(docs)["train-gpu"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
    indexed = pod_specs(docs)["score-gpu"]
    assert indexed["completionMode"] == "Indexed" and indexed["completions"] == 4
    # ... and a stopped scoring pod finishes its model call and takes a checkpoint: more than the default 30 s
    assert indexed["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    assert indexed["backoffLimitPerIndex"] >= 1 and indexed["maxFailedIndexes"] == 0
    cron = next(d for d in base if d["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0 and cron["timeZone"]
    config = next(d for d in base if d["kind"] == "ConfigMap")["data"]
    assert config["HF_TOKEN_PATH"] == "/var/run/secrets/huggingface/token" and config["HF_HOME"].startswith("/models/")
    # torch.compile's caches outlive the training pod (a retried one compiles nothing again); only its: torch makes
    # the folder at import, so any other PyTorch pod would fail on a read-only /models
    train_env = {e["name"]: e.get("value") for e in pod_specs(docs)["train-gpu"]["template"]["spec"]["containers"][0]["env"]}
    assert train_env["TORCHINDUCTOR_CACHE_DIR"].startswith("/models/") and train_env["TRITON_CACHE_DIR"].startswith("/models/")
    assert "TORCHINDUCTOR_CACHE_DIR" not in config and "TRITON_CACHE_DIR" not in config
    # A CronJob to unsuspend once /models/current holds a model, and no Job: applying the base starts nothing
    assert cron["suspend"] is True and not [d for d in base if d["kind"] == "Job"]
    merge = pod_specs(docs)["merge-gpu"]["template"]["spec"]["containers"][0]["args"]
    assert merge[merge.index("--expect-shards") + 1] == str(indexed["completions"]) and "--wait-seconds" in merge
    # The merge polls JSON for hours: it reserves a fraction of what a scoring pod does
    merging = pod_specs(docs)["merge-gpu"]["template"]["spec"]["containers"][0]["resources"]
    scoring = pod_specs(docs)["score-cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert parse_gi(merging["requests"]["memory"]) < parse_gi(scoring["requests"]["memory"])
    assert merging["requests"]["cpu"].endswith("m") and int(merging["requests"]["cpu"][:-1]) < 1000
    # Every Job goes through the Kueue queue it is given, the stage Job too
    for doc in every_kind(JobSettings(queue="team-a")):
        labels = (doc["spec"]["jobTemplate"]["metadata"] if doc["kind"] == "CronJob" else doc["metadata"])["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a", doc["metadata"]["name"]
    role = next(d for d in base if d["kind"] == "Role")
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"jobs", "pods", "pods/log"}
    assert not any("*" in rule["verbs"] for rule in role["rules"])


def test_bad_parameters_are_exit_2(runner):
    for args, message in [(["--name", "Bad_Name"], "must be a DNS label"), (["--namespace", "UPPER"], "valid Kubernetes"),
                          (["--queue", "no spaces"], "valid Kueue")]:
        result = runner.invoke(main, ["jobs", "render", "score", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(main, ["jobs", "render", "merge"])
    assert result.exit_code == 2 and "merge needs --out" in result.output
    for args, message in [(["--schedule", "notacron"], "expected five cron fields"),
                          (["--schedule", "61 2 * * *"], "'61' is not valid in the minute field"),
                          (["--schedule", "0 2 * * FUN"], "'FUN' is not valid in the day of week field"),
                          (["--schedule", "0 0 * * 7"], "'7' is not valid in the day of week field (0-6)"),
                          (["--schedule", "5-1 * * * *"], "'5-1' is not valid in the minute field (0-59, a range runs"),
                          (["--time-zone", "Mars/Base"], "not an IANA time zone")]:
        result = runner.invoke(main, ["jobs", "render", "nightly", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    for schedule in ("*/15 6-22 * JAN-MAR MON-FRI", "@daily", "0 0 1,15 * ?"):
        assert runner.invoke(main, ["jobs", "render", "nightly", "--schedule", schedule]).exit_code == 0, schedule


@pytest.mark.parametrize("edit, message", [
    (lambda job: job.update(spec=5), "the Job's spec must be an object"),
    (lambda job: job["spec"].update(completions="abc"), "spec.completions must be a non-negative integer"),
    (lambda job: job["spec"]["template"]["spec"].update(containers=5), "containers must be a non-empty list"),
    (lambda job: job["spec"]["template"]["spec"]["containers"][0].update(args="score"), "args must be a list of"),
    (lambda job: job.pop("metadata"), "every object must have metadata.name"),
])
def test_run_local_refuses_a_malformed_job_in_one_line(tmp_path, runner, edit, message):
    import yaml

    docs = docs_of(__import__("investment_risk.k8s.manifests", fromlist=["to_yaml"]).to_yaml(
        default_base()["shared.yaml"] + [build("score", JobSettings(), name="investment-risk-score")]))
    edit(next(d for d in docs if d["kind"] == "Job"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump_all(docs))
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path}"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_run_local_refuses_a_manifest_that_is_no_text_in_one_line(tmp_path, runner):
    (tmp_path / "a.parquet").write_bytes(b"PAR1\x80\x81 not text")
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", str(tmp_path / "a.parquet"),
                                  "--mount", f"/data={tmp_path}"])
    assert result.exit_code == 2 and "a.parquet: not a text file" in result.output, result.output


# --- image -------------------------------------------------------------------------------------------------------

def checkov() -> str:
    found = os.environ.get("CHECKOV") or next(
        (str(p) for p in (ROOT / ".venv-checkov" / "bin" / "checkov", BIN / "checkov") if p.exists()), None)
    if found is None:
        pytest.fail("checkov is not installed: `make test` puts it in .venv-checkov (it needs its own venv)")
    return found


def test_checkov_finds_no_failed_check(tmp_path):
    for args in (["-d", ROOT / "k8s", "--framework", "kubernetes", "kustomize"],
                 ["-f", ROOT / "Dockerfile", "--framework", "dockerfile"]):
        done = run([checkov(), *args, "--skip-download", "--compact", "--quiet", "-o", "json"], cwd=tmp_path)
        reports = json.loads(done.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        failed = [(c["check_id"], c["resource"]) for r in reports for c in r.get("results", {}).get("failed_checks", [])]
        assert done.returncode == 0 and not failed, failed or done.stderr
        assert sum(r["summary"]["passed"] for r in reports) > 0


def test_dockerfile_lints_clean_and_locks_one_cuda_stack():
    done = run([BIN / "hadolint", ROOT / "Dockerfile"])
    assert done.returncode == 0, done.stdout
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M) and 'ENTRYPOINT ["investment-risk"]' in dockerfile
    assert "--require-hashes" in dockerfile and "HF_HOME=/cache/" in dockerfile and dockerfile.count("FROM ") >= 2
    assert "HF_TOKEN" not in dockerfile.replace("HF_TOKEN_PATH", "")  # no token at build time
    # the stage Job verifies the hub's TLS against the system store: the final stage needs the CA bundle too
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"apt-get install [^&]*\bca-certificates\b", final_stage), final_stage
    lock = (ROOT / "docker" / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock, re.M))
    assert "onnxruntime" not in pins and "onnxruntime-gpu" in pins  # one runtime, the CUDA one
    torch_version = tuple(int(x) for x in pins["torch"].split(".")[:2])
    ort_version = tuple(int(x) for x in pins["onnxruntime-gpu"].split(".")[:2])
    assert torch_version >= (2, 11) and ort_version >= (1, 27)  # both CUDA 13 on PyPI
    assert pins["nvidia-cuda-runtime"].startswith("13.")
    assert not [name for name in pins if name.endswith("-cu12")]  # no second CUDA stack
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*" and "!src/" in ignored


# --- the cluster API, against a fake API server on a real port ---------------------------------------------------

@pytest.fixture
def fake(tmp_path):
    cluster = FakeCluster().start()
    cluster.kubeconfig(tmp_path / "kubeconfig")
    yield cluster
    cluster.stop()


def jobs_cli(runner, fake, tmp_path, *args):
    return runner.invoke(main, ["jobs", *args, "--kubeconfig", str(tmp_path / "kubeconfig")])


LOG = "\n".join([
    json.dumps({"event": "shard_start", "shard": 1, "stage": "score", "level": "info", "rows": 10,
                "timestamp": "2026-11-26T01:00:00Z", "run_id": "r"}),
    json.dumps({"event": "shard_done", "shard": 1, "stage": "score", "level": "info", "rows_in": 10,
                "timestamp": "2026-11-26T01:00:05Z", "run_id": "r"}),
    "a plain line"]) + "\n"


def test_submit_status_logs_cancel(fake, tmp_path, runner, monkeypatch):
    result = jobs_cli(runner, fake, tmp_path, "submit", "score", "--name", "nightly-1", "--shards", "3", "--profile", "cpu")
    assert result.exit_code == 0, result.output
    [event] = assert_json_stdout(result)  # a script reads the Job's name from stdout (it went to stderr as text)
    assert (event["event"], event["job"], event["kind"]) == ("job_created", "nightly-1", "score")
    created = fake.requests("post", "batch/v1/jobs")[0].data
    assert created["spec"]["completionMode"] == "Indexed" and created["spec"]["completions"] == 3
    fake.seed_status(NS, "nightly-1", {"active": 1, "succeeded": 2, "failed": 1, "completedIndexes": "0,2",
                                       "conditions": []})
    fake.seed_pod(NS, "nightly-1", "nightly-1-1-abc", "Running", LOG, index=1)
    fake.seed_pod(NS, "other", "other-0-x", "Running", "not ours\n")
    result = jobs_cli(runner, fake, tmp_path, "status", "nightly-1")  # piped: one JSON object, --json or not
    assert result.exit_code == 0, result.output
    [status] = assert_json_stdout(result)
    assert status["state"] == "Running" and status["succeeded"] == 2 and status["completed_indexes"] == "0,2"
    assert [p["name"] for p in status["pods"]] == ["nightly-1-1-abc"]
    result = jobs_cli(runner, fake, tmp_path, "logs", "nightly-1")
    assert result.exit_code == 0, result.output
    events = assert_json_stdout(result)
    assert [(e["pod"], e["event"]) for e in events] == [("nightly-1-1-abc", "shard_start"),
                                                        ("nightly-1-1-abc", "shard_done"),
                                                        ("nightly-1-1-abc", "pod_output")]
    assert events[1]["rows_in"] == 10 and events[2]["line"] == "a plain line" and "not ours" not in result.output
    result = jobs_cli(runner, fake, tmp_path, "logs", "nightly-1", "--tail", "1")
    assert [e.get("line") for e in assert_json_stdout(result)] == ["a plain line"]
    monkeypatch.setattr("investment_risk.cli.output.on_terminal", lambda: True)
    result = jobs_cli(runner, fake, tmp_path, "logs", "nightly-1")
    lines = result.stdout.splitlines()
    assert lines[0] == "nightly-1-1-abc: 2026-11-26 01:00:00 INFO    stage=score shard=1 shard_start rows=10"
    assert lines[2] == "nightly-1-1-abc: a plain line"
    fake.seed_pod(NS, "nightly-1", "nightly-1-2-def", "Pending", WAITING, index=2, waiting="ImagePullBackOff")
    result = jobs_cli(runner, fake, tmp_path, "status", "nightly-1")
    assert result.stdout.startswith("nightly-1: Running  completions 2/3")
    assert "completed indexes: 0,2" in result.stdout and "pod nightly-1-2-def: Pending waiting: ImagePullBackOff" \
        in result.stdout, result.stdout
    monkeypatch.undo()
    result = jobs_cli(runner, fake, tmp_path, "cancel", "nightly-1")
    assert result.exit_code == 0 and [e["event"] for e in assert_json_stdout(result)] == ["job_cancelled"]
    assert fake.requests("delete", "batch/v1/jobs")[0].data["propagationPolicy"] == "Background"
    result = jobs_cli(runner, fake, tmp_path, "status", "nightly-1")
    assert result.exit_code == 2 and "not found" in result.output


def test_pod_log_lines_are_redacted_like_our_own(fake, tmp_path, runner, monkeypatch):
    token = "hf_" + "Q" * 34
    leaky = "\n".join([json.dumps({"event": "loaded", "hf_token": "plain-secret", "note": f"with {token}"}),
                       f"Traceback: HF_TOKEN={token} password=hunter2 tokens_per_second=12", ""])
    assert jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "leaky").exit_code == 0
    fake.seed_pod(NS, "leaky", "leaky-0-x", "Running", leaky, index=0)
    for terminal in (False, True):
        monkeypatch.setattr("investment_risk.cli.output.on_terminal", lambda: terminal)
        result = jobs_cli(runner, fake, tmp_path, "logs", "leaky")
        assert result.exit_code == 0, result.output
        for secret in (token, "plain-secret", "hunter2"):
            assert secret not in result.output, (terminal, result.output)
        assert "tokens_per_second=12" in result.output  # a count named like a token stays


def _finish_when_created(fake, name: str, status: dict, pods: int = 2) -> threading.Thread:
    def finish() -> None:
        for _ in range(200):
            if fake.requests("post", "batch/v1/jobs"):
                break
            time.sleep(0.05)
        fake.seed_pod(NS, name, f"{name}-{pods}-pending", "Pending", WAITING, index=pods)  # no log yet: skipped
        time.sleep(0.3)
        for i in range(pods):
            fake.seed_pod(NS, name, f"{name}-{i}-x", "Succeeded", LOG, exit_code=0, index=i)
        time.sleep(0.3)
        fake.seed_status(NS, name, status)
    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("condition, exit_code", [
    ({"type": "Complete", "status": "True", "reason": "CompletionsReached"}, 0),
    ({"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}, 2),
    ({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}, 1),
])
def test_submit_wait_follows_the_logs_and_exits_with_the_outcome(fake, tmp_path, runner, condition, exit_code):
    thread = _finish_when_created(fake, "train-1", {"succeeded": int(exit_code == 0), "conditions": [condition]})
    result = jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1", "--wait", "--poll-seconds", "0.1",
                      "--timeout", "30")
    thread.join()
    assert result.exit_code == exit_code, result.output
    events = assert_json_stdout(result)  # the pods' lines, each with its pod, then the outcome
    done = [e for e in events if e["event"] == "shard_done"]
    assert sorted(e["pod"] for e in done) == ["train-1-0-x", "train-1-1-x"]  # each pod's lines once, however many polls
    assert (events[-1]["event"], events[-1]["job"], events[-1]["exit_code"]) == ("job_finished", "train-1", exit_code)


def test_cluster_errors_are_clear(fake, tmp_path, runner):
    import kmock

    fake.call(lambda: fake.emulator["get", kmock.resource("batch/v1/jobs"), kmock.name("secret")] << 403 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
        "message": 'jobs.batch "secret" is forbidden: User "x" cannot get resource "jobs"'})
    result = jobs_cli(runner, fake, tmp_path, "status", "secret")
    assert result.exit_code == 2 and "forbidden" in result.output and "pods/log" in result.output
    result = runner.invoke(main, ["jobs", "status", "x", "--kubeconfig", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no cluster configured" in result.output
    for text in ("garbage: [", "clusters: 5\n"):  # not YAML; YAML of the wrong shape
        (tmp_path / "bad-kubeconfig").write_text(text)
        result = runner.invoke(main, ["jobs", "status", "x", "--kubeconfig", str(tmp_path / "bad-kubeconfig")])
        assert result.exit_code == 2 and "bad-kubeconfig: not a kubeconfig" in result.output, result.output
    fake.stop()
    result = jobs_cli(runner, fake, tmp_path, "status", "x")
    assert result.exit_code == 1 and "cannot reach the cluster" in result.output


def test_wait_follows_an_existing_job_through_a_rotated_log_and_names_a_pod_that_cannot_start(fake, tmp_path, runner):
    assert jobs_cli(runner, fake, tmp_path, "submit", "score", "--name", "night-1", "--shards", "2").exit_code == 0
    fake.seed_pod(NS, "night-1", "night-1-0-x", "Running", LOG, index=0)
    fake.seed_pod(NS, "night-1", "night-1-1-y", "Pending", WAITING, index=1, waiting="ErrImagePull")

    def later() -> None:
        for reason in ("ImagePullBackOff", "ErrImagePull", "ImagePullBackOff"):  # as the kubelet alternates them
            time.sleep(0.2)
            fake.seed_pod(NS, "night-1", "night-1-1-y", "Pending", WAITING, index=1, waiting=reason)
        # the kubelet rotated the file; a progress bar's carriage return stays inside its line
        fake.append_log(NS, "night-1-0-x", "after the rotation\nloading 0%\rloading 100%\nlast\n", rotate=True)
        time.sleep(0.6)
        fake.seed_status(NS, "night-1", {"succeeded": 2, "conditions": [
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})
    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    result = jobs_cli(runner, fake, tmp_path, "wait", "night-1", "--poll-seconds", "0.1", "--timeout", "30")
    thread.join()
    assert result.exit_code == 0, result.output
    events = assert_json_stdout(result)
    lines = [e.get("line", e["event"]) for e in events if e.get("pod") == "night-1-0-x"]
    assert lines == ["shard_start", "shard_done", "a plain line", "after the rotation", "loading 0%\rloading 100%",
                     "last"]  # each once, none lost
    waiting = [e for e in events if e["event"] == "pod_waiting"]
    assert [(e["pod"], e["reason"]) for e in waiting] == [("night-1-1-y", "ErrImagePull"),
                                                          ("night-1-1-y", "ImagePullBackOff")]  # once each
    reads = [r for r in fake.requests("get", "v1/pods") if "log" in str(r)]
    assert reads and any("sinceSeconds" in getattr(r, "params", {}) for r in reads)  # not the whole log every poll


def test_wait_on_a_job_cancelled_meanwhile_says_it_was_deleted(fake, tmp_path, runner):
    assert jobs_cli(runner, fake, tmp_path, "submit", "score", "--name", "night-2").exit_code == 0
    from investment_risk.k8s import cluster as kube

    # another shell's `jobs cancel` (through the API, not a second CliRunner: they would share sys.stdout)
    thread = threading.Timer(0.5, lambda: kube.cancel(kube.connect(NS, tmp_path / "kubeconfig", None), "night-2"))
    thread.start()
    result = jobs_cli(runner, fake, tmp_path, "wait", "night-2", "--poll-seconds", "0.1", "--timeout", "30")
    thread.join()
    events = assert_json_stdout(result)
    assert result.exit_code == 1 and "job_deleted" in [e["event"] for e in events], result.output
    assert events[-1]["event"] == "job_finished" and events[-1]["state"] == "Deleted"


def test_wait_rides_out_failed_polls_and_says_when_it_gives_up(monkeypatch):
    from investment_risk.core.errors import RetryableError
    from investment_risk.k8s import cluster as kube

    done = {"state": "Complete", "pods": [], "succeeded": 1, "failed": 0, "conditions": []}
    answers = [RetryableError("cannot reach the cluster")] * 3 + [done]

    def status(cluster, name):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(kube, "job_status", status)
    with capture_logs() as logs:
        assert kube.wait(SimpleNamespace(namespace=NS), "j", lambda pod, line: None, poll_s=0.01) is done
    assert [e["failures"] for e in logs if e["event"] == "poll_failed"] == [1, 2, 3]
    answers[:] = [RetryableError("cannot reach the cluster")] * kube.POLL_FAILURES
    with pytest.raises(RetryableError, match="jobs wait j"):
        kube.wait(SimpleNamespace(namespace=NS), "j", lambda pod, line: None, poll_s=0.01)
    answers[:] = [RetryableError("cannot reach the cluster")] * kube.POLL_FAILURES
    with pytest.raises(RetryableError, match="still unknown after"):  # --timeout holds while polls fail
        kube.wait(SimpleNamespace(namespace=NS), "j", lambda pod, line: None, poll_s=0.05, timeout_s=0.1)


def test_a_pod_whose_log_cannot_be_read_is_skipped_and_the_others_are_followed():
    from kubernetes.client.rest import ApiException

    from investment_risk.k8s.cluster import LogFollower

    def read(pod, namespace, **kwargs):
        if pod == "lost":  # on a node the API server cannot reach
            raise ApiException(status=500, reason="Internal Server Error")
        return "2026-12-01T00:00:01.5Z hello\n"
    cluster = SimpleNamespace(namespace=NS, core=SimpleNamespace(read_namespaced_pod_log=read),
                              request_timeout=lambda: (1.0, 1.0))
    with capture_logs() as logs:
        assert list(LogFollower().new_lines(cluster, "j", ["lost", "ok"])) == [("ok", "hello")]
    assert [(e["event"], e["pod"]) for e in logs] == [("pod_log_unreadable", "lost")]


def test_log_reads_stop_at_the_waits_deadline():
    # Ten pods whose log reads each hung for their timeout took `jobs wait --timeout 3` to 16 s.
    from investment_risk.k8s.cluster import LogFollower

    reads = []

    def read(pod, namespace, **kwargs):
        reads.append(pod)
        time.sleep(0.2)  # an answer that comes only at the request's timeout
        return ""
    cluster = SimpleNamespace(namespace=NS, core=SimpleNamespace(read_namespaced_pod_log=read),
                              request_timeout=lambda: (1.0, 1.0), deadline=time.monotonic() + 0.5)
    assert list(LogFollower().new_lines(cluster, "j", [f"p{i}" for i in range(10)])) == []
    assert 2 <= len(reads) <= 4


def test_a_refused_request_is_exit_2_and_a_taken_name_says_how_to_follow_it(fake, tmp_path, runner):
    import kmock

    assert jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1").exit_code == 0
    result = jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1")
    assert result.exit_code == 2 and "already exists" in result.output and "jobs wait" in result.output
    fake.call(lambda: fake.emulator["post", kmock.resource("batch/v1/jobs")] << 400 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 400, "reason": "BadRequest",
        "message": 'admission webhook "quota.example.com" denied the request'})
    result = jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-2")
    assert result.exit_code == 2 and "rejected by the API server" in result.output and "denied" in result.output


def test_kubeconfig_in_the_environment_wins_over_in_cluster_config(fake, tmp_path, runner, monkeypatch):
    assert jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1").exit_code == 0
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # as inside any pod (a CI runner's, say)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    result = runner.invoke(main, ["jobs", "status", "train-1"])
    assert result.exit_code == 0, result.output
    # A $KUBECONFIG whose files are missing is no config (as client-go reads it): the pod's own is tried
    from kubernetes import config

    def in_cluster():
        raise config.ConfigException("in-cluster config tried")
    monkeypatch.setattr(config, "load_incluster_config", in_cluster)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    result = runner.invoke(main, ["jobs", "status", "train-1"])
    assert result.exit_code == 2 and "in-cluster config tried" in result.output, result.output


def test_a_kubeconfig_in_home_wins_over_in_cluster_config_as_kubectl_chooses(fake, tmp_path, runner, monkeypatch):
    # A CI runner's pod with ~/.kube/config: the pod's missing service-account token was all it tried.
    assert jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1").exit_code == 0
    (tmp_path / "home" / ".kube").mkdir(parents=True)
    shutil.copy(tmp_path / "kubeconfig", tmp_path / "home" / ".kube" / "config")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    result = runner.invoke(main, ["jobs", "status", "train-1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["jobs", "status", "train-1", "--context", "nosuchctx"])
    assert result.exit_code == 2 and "--context nosuchctx: no such context in" in result.output, result.output


def test_logs_of_a_job_that_is_not_there_is_not_found_and_of_one_without_pods_says_so(fake, tmp_path, runner):
    result = jobs_cli(runner, fake, tmp_path, "logs", "no-such-job")  # exit 0 and nothing at all, before
    assert result.exit_code == 2 and "not found" in result.output, result.output
    assert jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "train-1").exit_code == 0
    result = jobs_cli(runner, fake, tmp_path, "logs", "train-1")
    assert result.exit_code == 0 and [e["event"] for e in assert_json_stdout(result)] == ["no_pod_logs"]


def test_two_submits_in_one_second_get_two_jobs_and_an_empty_name_is_refused(fake, tmp_path, runner):
    for _ in range(2):
        assert jobs_cli(runner, fake, tmp_path, "submit", "train").exit_code == 0
    names = [r.data["metadata"]["name"] for r in fake.requests("post", "batch/v1/jobs")]
    assert len(set(names)) == 2 and all(re.fullmatch(r"investment-risk-train-\d{8}-\d{6}-[0-9a-f]{4}", n) for n in names)
    result = jobs_cli(runner, fake, tmp_path, "submit", "train", "--name", "")
    assert result.exit_code == 2 and "--name ''" in result.output and len(fake.requests("post", "batch/v1/jobs")) == 2


def test_an_api_server_that_never_answers_cannot_hold_a_command_past_its_timeout(tmp_path, runner):
    # It accepted the connection and never answered: `jobs wait --timeout 5` still ran after 45 s.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    (tmp_path / "kc").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    started = time.monotonic()
    hang_up = threading.Timer(15, server.close)  # were the timeout lost again, the test fails rather than hangs
    hang_up.start()
    try:
        result = runner.invoke(main, ["jobs", "wait", "x", "--kubeconfig", str(tmp_path / "kc"), "--timeout", "2",
                                      "--poll-seconds", "0.5"])
    finally:
        hang_up.cancel()
        server.close()
    assert result.exit_code == 1 and "still unknown after 2 s" in result.output, result.output
    assert time.monotonic() - started < 10  # its 2 s, and a poll cut at what was left of them


def test_401_says_the_credentials_were_refused_and_a_refused_connection_is_one_short_line(fake, tmp_path, runner):
    import kmock

    fake.call(lambda: fake.emulator["get", kmock.resource("batch/v1/jobs"), kmock.name("j")] << 401 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 401, "reason": "Unauthorized",
        "message": "Unauthorized"})
    result = jobs_cli(runner, fake, tmp_path, "status", "j")
    assert result.exit_code == 2 and "unauthorized" in result.output and "Role" not in result.output, result.output
    fake.stop()
    result = jobs_cli(runner, fake, tmp_path, "status", "x")
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and error.endswith("(connection refused)") and len(error) < 200, result.output
    assert "Retrying" not in result.output  # the client's own retries printed a warning each


# --- run-local: the pod contract without a cluster ---------------------------------------------------------------

def test_run_local_three_shards_match_a_single_score_run(exported, tmp_path, runner, monkeypatch):
    _, model, _ = exported
    data, models = tmp_path / "data", tmp_path / "models"
    (data / "in").mkdir(parents=True)
    table = generate(SynthConfig(rows=150, seed=31))
    for i in range(3):
        pq.write_table(table.slice(i * 50, 50), data / "in" / f"batch-{i}.parquet", row_group_size=20)
    shutil.copytree(model, models / "current")
    single = score(ScoreConfig(model=models / "current", inputs=(str(data / "in"),), out=tmp_path / "single"))
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "rl",
                                  "--shards", "3", "--parallelism", "2", "--model", "/models/current",
                                  "--input", "/data/in", "--out", "/data/scored/$(JOB_NAME)"])
    assert result.exit_code == 0, result.output
    (tmp_path / "job.yaml").write_text(result.output)
    monkeypatch.chdir(tmp_path)  # relative mounts, as the README runs it: the pods start in their own /tmp
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", "job.yaml",
                                  "--mount", "/data=./data", "--mount", "/models=./models"])
    assert result.exit_code == 0, result.output
    [done] = [e for e in assert_json_stdout(result) if e["event"] == "local_job_done"]  # a pipe gets JSON only
    assert done["succeeded"] == [0, 1, 2] and done["failed"] == [] and done["fail_reason"] is None
    out = data / "scored" / "rl"  # $(JOB_NAME) expanded from the downward API, as the kubelet does
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["part-00000", "part-00001", "part-00002"]
    merged = json.loads((out / "metrics.json").read_text())
    assert merged["complete"] and merged["shards"] == 3 and merged["rows_in"] == single["rows_in"] == 150

    def rows(directory: Path) -> pa.Table:
        parts = pa.concat_tables([pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))])
        return parts.sort_by("id")

    local, alone = rows(out), rows(tmp_path / "single")
    assert local.column("id").to_pylist() == alone.column("id").to_pylist()
    assert local.column("signal_tier").to_pylist() == alone.column("signal_tier").to_pylist()
    for dim in DIMENSIONS:
        np.testing.assert_allclose(local.column(dim).to_numpy(zero_copy_only=False),
                                   alone.column(dim).to_numpy(zero_copy_only=False), atol=1e-4)


def test_run_local_exit_2_fails_the_job_and_unmapped_pvcs_are_refused(tmp_path, runner):
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "bad",
                                  "--shards", "2", "--model", "/models/missing", "--input", "/data/in"])
    (tmp_path / "job.yaml").write_text(result.output)
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}"])
    assert result.exit_code == 2 and "--mount /models=DIR" in result.output
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}", "--mount", f"/models={tmp_path / 'models'}"])
    assert result.exit_code == 2, result.output  # the model is missing: exit 2 -> FailJob, no retries
    assert "failed" in result.output


def test_run_local_maps_each_path_once_and_option_values_too(tmp_path):
    from investment_risk.k8s.runlocal import map_to_local, pod_spec
    docs = docs_of(__import__("investment_risk.k8s.manifests", fromlist=["to_yaml"]).to_yaml(
        default_base()["shared.yaml"] + [build("score", JobSettings(), name="investment-risk-score")]))
    job = next(d for d in docs if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["args"] += ["--cache=$(INVESTMENT_RISK_CACHE)", "--x=/data/y"]
    mounts = {"/data": tmp_path / "data", "/models": tmp_path / "models", "/cache": tmp_path / "scratch" / "cache",
              "/tmp": tmp_path / "scratch" / "tmp"}
    args, env = map_to_local(*pod_spec(job, docs, 2), mounts)  # as ProcessRuntime.start maps them
    assert f"--cache={tmp_path}/scratch/cache/investment-risk" in args and f"--x={tmp_path}/data/y" in args
    # a path under no volume is on the pod's read-only root: refused here, where it would write to this machine
    for outside in ("/scored-outside/x", "--out=/etc/x"):
        job["spec"]["template"]["spec"]["containers"][0]["args"].append(outside)
        with pytest.raises(ConfigError, match="under none of the pod's volumes"):
            map_to_local(*pod_spec(job, docs, 2), mounts)
        job["spec"]["template"]["spec"]["containers"][0]["args"].pop()
    assert env["INVESTMENT_RISK_CACHE"] == f"{tmp_path}/scratch/cache/investment-risk"
    assert env["JOB_COMPLETION_INDEX"] == "2" and env["JOB_NAME"] == job["metadata"]["name"]


def test_run_local_runs_a_cronjob_as_the_job_it_creates(tmp_path):
    from investment_risk.k8s.runlocal import pick_job, pod_spec

    docs = docs_of(kustomize(ROOT / "k8s" / "overlays" / "cpu"))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    job = pick_job(docs, None, tmp_path / "overlay.yaml")  # the file's one runnable workload
    assert job["metadata"]["name"] == cron["metadata"]["name"] and job["spec"] == cron["spec"]["jobTemplate"]["spec"]
    args, env = pod_spec(job, docs, 1)
    assert env["JOB_NAME"] == cron["metadata"]["name"] and env["JOB_COMPLETION_INDEX"] == "1"
    assert args[args.index("--out") + 1] == f"/data/scored/{cron['metadata']['name']}" and "--ledger" in args
    # the nightly's metrics are the group its dashboard and alerts read; an ad-hoc batch's go elsewhere
    assert args[args.index("--metrics-group") + 1] == "nightly"


@pytest.mark.parametrize("edit, codes, reason, failed, succeeded", [
    # Per index, no maxFailedIndexes: the other indexes run to their end, then the Job fails.
    (lambda spec: spec.pop("maxFailedIndexes"), {0: 1, 1: 0}, "FailedIndexes", [0], [1]),
    # Past maxFailedIndexes the Job fails at once and the slow index is stopped.
    (lambda spec: None, {0: 1, 1: 0}, "MaxFailedIndexesExceeded", [0], []),
    # A NotIn rule: every code but the listed ones fails the Job (here 3), rules in order.
    (lambda spec: spec["podFailurePolicy"]["rules"].insert(0, {"action": "FailJob", "onExitCodes": {
        "operator": "NotIn", "values": [1, 2]}}), {0: 3, 1: 0}, "PodFailurePolicy", [0], []),
    # backoffLimit (no per-index limits) counts every pod's failures together.
    (lambda spec: [spec.pop(k) for k in ("backoffLimitPerIndex", "maxFailedIndexes")] and spec.update(backoffLimit=1),
     {0: 1, 1: 1}, "BackoffLimitExceeded", [0], []),
])
def test_run_local_follows_the_job_controllers_failure_rules(tmp_path, monkeypatch, edit, codes, reason, failed,
                                                            succeeded):
    from investment_risk.k8s import runlocal

    job = build("score", JobSettings(profile="cpu"), name="rules", shards=2)
    job["spec"]["backoffLimitPerIndex"] = 0
    edit(job["spec"])
    (tmp_path / "job.yaml").write_text(to_yaml(default_base()["shared.yaml"] + [job]))
    pod = ("import os, sys, time; i = int(os.environ['JOB_COMPLETION_INDEX']); time.sleep(3 * i); "
           f"sys.exit({codes}[i])")
    monkeypatch.setattr(runlocal.ProcessRuntime, "start",
                        lambda self, index, args, env: subprocess.Popen([sys.executable, "-c", pod], env={**env}))
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    result = runlocal.run_local(tmp_path / "job.yaml", {"/data": tmp_path / "data", "/models": tmp_path / "models"})
    assert (result.fail_reason, result.failed, result.succeeded) == (reason, failed, succeeded)


def test_run_local_pods_get_their_own_environment_not_this_shells(tmp_path, monkeypatch):
    from investment_risk.k8s import runlocal
    monkeypatch.setenv("INVESTMENT_RISK_SHARD_INDEX", "0")  # would score shard 0 in every pod
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    monkeypatch.setenv("_INVESTMENT_RISK_KILL_AT", "after_rename:*")  # a test hook: kept
    monkeypatch.setenv("PYTHONPATH", f"src{os.pathsep}/abs")  # relative to here, not to the pod's /tmp
    started = []
    monkeypatch.setattr(runlocal.subprocess, "Popen", lambda args, env, cwd: started.append({**env, "cwd": cwd}))
    docs = docs_of(to_yaml(default_base()["shared.yaml"] + [build("score", JobSettings(), name="investment-risk-score")]))
    job = next(d for d in docs if d["kind"] == "Job")
    pods = runlocal.ProcessRuntime(job, {"/data": tmp_path / "data", "/models": tmp_path / "models"}, tmp_path)
    pods.start(1, *runlocal.pod_spec(job, docs, 1))
    env = started[0]
    assert "INVESTMENT_RISK_SHARD_INDEX" not in env and "HF_TOKEN" not in env
    assert env["JOB_COMPLETION_INDEX"] == "1" and env["_INVESTMENT_RISK_KILL_AT"] == "after_rename:*"
    assert env["INVESTMENT_RISK_RUN_ID"] == "investment-risk-score"  # every shard's lines carry the Job's name
    assert env["HOME"] == env["TMPDIR"] == pods.tmp and env["PATH"] == os.environ["PATH"]
    assert env["cwd"] == pods.tmp  # the image's working directory: a relative path lands in the pod's /tmp
    assert env["PYTHONPATH"] == f"{os.path.abspath('src')}{os.pathsep}/abs"


# --- run-local --runtime docker: the pod spec as `docker run` arguments (a recording stand-in for the client) -------

FAKE_DOCKER = """#!/bin/sh
# Records each call (one argument a line, then the env it was asked to pass) and behaves as FAKE_DOCKER_MODE says.
# One write a call: two pods' line-by-line appends interleaved under load and ran their records together.
record=$(for a in "$@"; do echo "$a"; done; echo "JOB_COMPLETION_INDEX=$JOB_COMPLETION_INDEX"; echo ---)
printf '%s\n' "$record" >> "$FAKE_DOCKER_LOG"
case "$1" in stop) exit 0 ;; esac
[ "$FAKE_DOCKER_MODE" = sleep ] && exec sleep 120
exit 0
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(tmp_path / "docker.log"))
    return tmp_path / "docker.log"


def docker_calls(log: Path) -> list[list[str]]:
    return [call.strip("\n").split("\n") for call in log.read_text().split("---\n") if call.strip()]


def test_run_local_docker_gives_each_container_the_pods_contract(fake_docker, tmp_path, runner):
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "rd",
                                  "--shards", "2", "--image", "example/ir:1"])
    (tmp_path / "job.yaml").write_text(result.output)
    for d in ("data", "models"):
        (tmp_path / d).mkdir()
    result = runner.invoke(main, ["jobs", "run-local", "--runtime", "docker", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}", "--mount", f"/models={tmp_path / 'models'}"])
    assert result.exit_code == 0, result.output
    calls = docker_calls(fake_docker)
    assert sorted(c[-1] for c in calls) == ["JOB_COMPLETION_INDEX=0", "JOB_COMPLETION_INDEX=1"]
    args = calls[0]
    joined = " ".join(args)
    assert args[:2] == ["run", "--rm"] and "example/ir:1" in args
    for flag in ("--read-only", "--user 10001:10001", "--group-add 10001", "--cap-drop ALL",
                 "--security-opt no-new-privileges", "--network none", "--cpus 2", f"--memory {8 * 2**30}",
                 f"--tmpfs /tmp:mode=1777,size={4 * 2**30}", f"--tmpfs /cache:mode=1777,size={20 * 2**30}",
                 f"type=bind,source={tmp_path / 'data'},target=/data", "target=/var/run/secrets/huggingface,readonly"):
        assert flag in joined, flag
    # Env goes by name (values stay out of the process list): the ConfigMap, the container's env and the index.
    names = {args[i + 1] for i, a in enumerate(args) if a == "--env"}
    assert {"JOB_COMPLETION_INDEX", "JOB_NAME", "INVESTMENT_RISK_DEVICE", "HF_HOME"} <= names
    image_at = args.index("example/ir:1")
    assert args[image_at + 1] == "score" and "/data/scored/rd" in args[image_at + 1:]  # pod paths, not mapped
    # fsGroup: the kubelet makes a PVC group-owned and group-writable for the pod.
    assert (tmp_path / "data").stat().st_gid == 10001 and (tmp_path / "data").stat().st_mode & 0o2070 == 0o2070


def test_run_local_stops_its_pods_when_it_is_stopped(fake_docker, tmp_path, runner, monkeypatch):
    from types import SimpleNamespace

    from investment_risk.core.errors import Terminated
    from investment_risk.k8s import runlocal
    monkeypatch.setenv("FAKE_DOCKER_MODE", "sleep")
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "stop",
                                  "--shards", "2"])
    (tmp_path / "job.yaml").write_text(result.output)
    for d in ("data", "models"):
        (tmp_path / d).mkdir()

    def sigterm(seconds):  # what the SIGTERM handler raises in the main thread, once both pods run
        raise Terminated()
    monkeypatch.setattr(runlocal, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sigterm))
    result = runner.invoke(main, ["jobs", "run-local", "--runtime", "docker", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}", "--mount", f"/models={tmp_path / 'models'}"])
    assert result.exit_code == 1, result.output
    assert sum(1 for c in docker_calls(fake_docker) if c[:3] == ["stop", "--time", str(SCORE_GRACE_S)]) == 2  # SIGTERM first


def test_run_local_stops_pods_at_the_active_deadline(fake_docker, tmp_path, runner, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_MODE", "sleep")
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "late",
                                  "--shards", "2"])
    docs = [d for d in yaml.safe_load_all(result.output) if d]
    next(d for d in docs if d["kind"] == "Job")["spec"]["activeDeadlineSeconds"] = 1
    (tmp_path / "job.yaml").write_text(to_yaml(docs))
    for d in ("data", "models"):
        (tmp_path / d).mkdir()
    started = time.monotonic()
    result = runner.invoke(main, ["jobs", "run-local", "--runtime", "docker", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}", "--mount", f"/models={tmp_path / 'models'}"])
    assert result.exit_code == 1 and "DeadlineExceeded" in result.output, result.output
    assert time.monotonic() - started < 60  # the pods (sleeping 120 s) were stopped, not waited for
    assert sum(1 for c in docker_calls(fake_docker) if c[:3] == ["stop", "--time", str(SCORE_GRACE_S)]) == 2  # SIGTERM first


def test_render_refuses_what_the_api_server_or_the_merge_would_not_take(runner, tmp_path):
    base = ["jobs", "render", "score", "--image", "r/i:1", "--model", "/models/current", "--input", "/data/in",
            "--out", "/data/out"]
    for extra, message in ((["--shards", "100001"], "at most 100000 completions"),
                           (["--extra-arg", "--shard-count", "--extra-arg", "9"], "--extra-arg --shard-count"),
                           (["--input", " "], "--input: an empty path")):
        result = runner.invoke(main, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    # A nightly CronJob into one fixed folder: from the second night on every shard would be "already done"
    result = runner.invoke(main, ["jobs", "render", "nightly", "--out", "/data/scored/nightly"])
    assert result.exit_code == 2 and "--out /data/scored/nightly: a nightly run needs a folder of its own" in result.output
    result = runner.invoke(main, ["jobs", "render", "shared", "--models-size", "0"])
    assert result.exit_code == 2 and "--models-size '0'" in result.output, result.output


def test_render_refuses_a_path_the_pod_would_refuse_or_misread(runner):
    """An empty path would read as the pod's working directory (a merge Job then waits a day for shards there); a
    URL or a path given twice fails in the pod only after scheduling and the image pull."""
    for command, message in ((["merge", "--out", ""], "--out: an empty path"),
                             (["train", "--data", ""], "--data: an empty path"),
                             (["train", "--out", " "], "--out: an empty path"),
                             (["export", "--run", "/models/runs/r", "--out", ""], "--out: an empty path"),
                             (["score", "--out", "s3://bucket/scored"], "s3://bucket/scored: a URL"),
                             (["score", "--input", "gs://bucket/in"], "gs://bucket/in: a URL"),
                             (["train", "--data", "/data/a", "--data", "/data/b"], "--data was given more than once")):
        result = runner.invoke(main, ["jobs", "render", *command, "--name", "j"])
        assert result.exit_code == 2 and message in result.output, (command, result.output)
    # a repeatable option's environment value splits at whitespace, as the README says of every one
    result = runner.invoke(main, ["jobs", "render", "score", "--name", "j"],
                           env={"INVESTMENT_RISK_INPUT": "/data/a /data/b:c"})
    args = yaml.safe_load(result.output)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--input"] == ["/data/a", "/data/b:c"]


def test_render_parses_the_pods_command_as_the_image_will(runner):
    """A relative path lands in the pod's /tmp and is deleted with it while the Job succeeds; an --extra-arg that
    names a URL, a typo or an option the Job already sets fails only in the pod (or silently wins)."""
    for command, message in (
            (["score", "--out", "scored/batch1"], "--out scored/batch1: a relative path"),
            (["train", "--out", "runs/t1"], "--out runs/t1: a relative path"),
            (["score", "--extra-arg", "--input=s3://bucket/new"], "--input s3://bucket/new: a URL"),
            (["score", "--extra-arg", "--ledger=ledger.json"], "--ledger ledger.json: a relative path"),
            (["score", "--extra-arg", "--model", "--extra-arg", "/models/other"], "--model is set by the Job itself"),
            (["merge", "--out", "/data/s", "--extra-arg", "--wait-seconds=10"], "--wait-seconds is set by the Job"),
            (["train", "--extra-arg", "--data=/x"], "--data was given more than once"),
            (["score", "--extra-arg", "--forcee"], "No such option '--forcee'"),
            (["score", "--extra-arg", "--token-budget=12"], "12 is not in the range"),
            (["stage", "--extra-arg", "--revision"], "No such option '--revision'"),
            (["train", "--shards", "8", "--backend", "torch"], "--shards, --backend: not an option of a train Job"),
            (["merge", "--out", "/data/s", "--model", "/models/m"], "--model: not an option of a merge Job")):
        result = runner.invoke(main, ["jobs", "render", *command, "--name", "j"])
        assert result.exit_code == 2 and message in result.output, (command, result.output)
    # what the pod's command takes goes through: the merge's too (it was dropped)
    for kind, paths, passed in (("merge", ["--out", "/data/s"], ["--pushgateway", "http://pg:9091"]),
                                ("score", [], ["--force", "--input=/data/more", "/data/other"]),
                                ("train", [], ["--epochs=3", "--epochs=4"])):  # twice by the user: the last wins
        extra = [arg for value in passed for arg in ("--extra-arg", value)]
        result = runner.invoke(main, ["jobs", "render", kind, "--name", "j", *paths, *extra])
        assert result.exit_code == 0, result.output
        args = yaml.safe_load(result.output)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-len(passed):] == passed, args


@pytest.mark.parametrize("extra", [["--ledger=/data/backfill/ledger.json", "--metrics-group=backfill"],
                                   ["--ledger", "/data/backfill/ledger.json", "--metrics-group", "backfill"]])
def test_nightly_keeps_the_ledger_and_group_an_extra_arg_names_in_either_form(extra):
    cron = build("nightly", JobSettings(), extra_args=tuple(extra))
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    # a second CronJob (a backfill) sharing the nightly's ledger would skip its units; its own group keeps the
    # nightly's dashboard and alerts to the nightly
    assert args[-len(extra):] == extra and "nightly" not in args and "/data/scored/ledger.json" not in args


def test_render_all_names_a_jobs_own_option_it_ignores_and_takes_the_storage_ones():
    result = CliRunner().invoke(main, ["jobs", "render", "all", "--schedule", "0 1 * * *"])
    assert result.exit_code == 0 and "--schedule ignored" in result.stderr, result.stderr
    assert "0 1 * * *" not in result.stdout and "30 2 * * *" in result.stdout  # the YAML alone on stdout
    result = CliRunner().invoke(main, ["jobs", "render", "all", "--storage-class", "efs"])
    assert result.exit_code == 0 and "storageClassName: efs" in result.stdout and not result.stderr
