"""Run a rendered Job's pods on this machine: the pod contract end to end, without a cluster.

One pod per completion index, at most `parallelism` at once, each with the environment its pod would get (the
ConfigMap, the container's env, JOB_COMPLETION_INDEX, JOB_NAME). The process runtime (the default) runs each pod
as a process of this Python with every mount path mapped to a local directory: PVCs to the directories given with
--mount, emptyDirs and secrets to fresh temporary ones. The docker runtime (containers.py) runs each as a container
of the Job's image, as the kubelet would. A failed pod meets the podFailurePolicy's exit-code rules in order (In or
NotIn; FailJob, FailIndex, Ignore or Count), then the retry limits as the Job controller keeps them: with
backoffLimitPerIndex each index on its own (the others run on; past maxFailedIndexes the Job fails at once, else it
fails once all have run), with backoffLimit every pod's failure together. activeDeadlineSeconds fails the Job.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.logs import get_logger

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class LocalResult:
    job: str
    completions: int
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    exit_codes: dict[int, list[int]] = field(default_factory=dict)
    failed_job: bool = False  # the Job failed as a whole: see fail_reason
    # PodFailurePolicy (an exit code with a FailJob rule), FailedIndexes, MaxFailedIndexesExceeded,
    # BackoffLimitExceeded or DeadlineExceeded: the Job condition's reason on a cluster
    fail_reason: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed_job and len(self.succeeded) == self.completions


def load_manifests(path: Path) -> list[dict[str, Any]]:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    except UnicodeDecodeError as exc:  # a Parquet file or an image given by mistake
        raise ConfigError(f"{path}: not a text file (invalid UTF-8 at byte {exc.start}), so no YAML manifest") from None
    if not all(isinstance(d, dict) and "kind" in d for d in docs):
        raise ConfigError(f"{path}: every document must be a Kubernetes object with a kind")
    return docs


def check_job(job: dict[str, Any], source: Path) -> None:
    """The fields run-local reads, checked for their Kubernetes types first: a malformed Job is one line (exit 2)."""
    def need(ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: the Job's {where} must be {what}")

    def objects(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)

    spec = job.get("spec")
    need(isinstance(spec, dict), "spec", "an object")
    for key in ("completions", "parallelism", "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes",
                "activeDeadlineSeconds"):
        value = spec.get(key)
        need(value is None or (type(value) is int and value >= 0), f"spec.{key}", "a non-negative integer")
    need(isinstance(spec.get("podFailurePolicy", {}), dict) and objects(spec.get("podFailurePolicy", {}).get(
        "rules", [])), "spec.podFailurePolicy.rules", "a list of objects")
    template = spec.get("template")
    need(isinstance(template, dict) and isinstance(template.get("spec"), dict), "spec.template.spec", "an object")
    pod = template["spec"]
    need(objects(pod.get("containers")) and bool(pod["containers"]), "spec.template.spec.containers",
         "a non-empty list of objects")
    need(objects(pod.get("volumes", [])), "pod's volumes", "a list of objects")
    container = pod["containers"][0]
    for key in ("command", "args"):
        value = container.get(key, [])
        need(isinstance(value, list) and all(isinstance(v, str) for v in value), f"container's {key}",
             "a list of strings")
    for key in ("env", "envFrom", "volumeMounts"):
        need(objects(container.get(key, [])), f"container's {key}", "a list of objects")
    need(all(isinstance(m.get("mountPath"), str) and isinstance(m.get("name"), str)
             for m in container.get("volumeMounts", [])), "container's volumeMounts", "named, with a mountPath")


def pick_job(docs: list[dict[str, Any]], name: str | None, source: Path) -> dict[str, Any]:
    if not all(isinstance(d.get("metadata"), dict) and isinstance(d["metadata"].get("name"), str) for d in docs):
        raise ConfigError(f"{source}: every object must have metadata.name")
    # A CronJob runs as the Job it would create (as `kubectl create job --from=cronjob/NAME` does), under its name.
    all_jobs = [d for d in docs if d["kind"] == "Job"] + [_job_of(d) for d in docs if d["kind"] == "CronJob"]
    jobs = [d for d in all_jobs if name is None or d["metadata"]["name"] == name]
    if len(jobs) != 1:
        found = ", ".join(d["metadata"]["name"] for d in all_jobs) or "none"
        problem = (f"no Job named {name!r}" if name else "no Job" if not all_jobs else "more than one Job")
        raise ConfigError(f"{source}: {problem} (Jobs in the file: {found}); render one with `jobs render KIND`"
                          + (" and pass --job NAME" if len(all_jobs) > 1 else ""))
    check_job(jobs[0], source)
    return jobs[0]


def _job_of(cronjob: dict[str, Any]) -> dict[str, Any]:
    spec = cronjob.get("spec")
    template = spec.get("jobTemplate") if isinstance(spec, dict) else None
    template = template if isinstance(template, dict) else {}  # malformed: check_job names what is missing
    labels = template.get("metadata") if isinstance(template.get("metadata"), dict) else {}
    meta = {**labels, "name": cronjob["metadata"]["name"],
            "namespace": cronjob["metadata"].get("namespace")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": template.get("spec")}


def _map_path(value: str, mounts: dict[str, Path]) -> str:
    """Rewrite a pod path under a mount to the local directory standing in for it; refuse one that climbs out."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            inside = posixpath.normpath(value)
            if inside != mount and not inside.startswith(mount.rstrip("/") + "/"):
                raise ConfigError(f"path {value!r} climbs out of the mount {mount}: refused")
            return str(mounts[mount]) + inside[len(mount.rstrip("/")):]
    return value


def _expand(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def pod_spec(job: dict[str, Any], docs: list[dict[str, Any]], index: int | None) -> tuple[list[str], dict[str, str]]:
    """The container's command + args and environment as the kubelet would set them, in the pod's own paths."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref is not None:
            if ref not in configmaps and not source["configMapRef"].get("optional"):
                raise ConfigError(f"ConfigMap {ref!r} is not in the manifest file; render with the shared resources")
            env.update(configmaps.get(ref, {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "job-name" in item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""):
            env[item["name"]] = job["metadata"]["name"]
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    return [_expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]], env


def map_to_local(args: list[str], env: dict[str, str], mounts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """pod_spec's args and env with every path under a mount mapped to the local directory standing in for it (the
    process runtime). $(VAR) is expanded with the pod's values first, then paths are mapped once (twice would nest
    the local dirs)."""
    return [_map_arg(a, mounts) for a in args], {k: _map_path(v, mounts) for k, v in env.items()}


def _map_arg(arg: str, mounts: dict[str, Path]) -> str:
    """A path argument, or the value of `--option=/path`, mapped to its local directory. An absolute path under no
    mount is refused: in a pod it is on the image's read-only root, where the command fails (here it would write
    into this machine's own folders, and pass)."""
    option, value = arg.split("=", 1) if arg.startswith("-") and "=" in arg else ("", arg)
    if value.startswith("/") and _map_path(value, mounts) == value:
        raise ConfigError(f"path {value!r} is under none of the pod's volumes ({', '.join(sorted(mounts))}): in a "
                          "pod it is on the read-only root filesystem")
    return f"{option}={_map_path(value, mounts)}" if option else _map_path(value, mounts)


def _mounts(job: dict[str, Any], given: dict[str, Path], scratch: Path) -> dict[str, Path]:
    """Every volume mount mapped: given directories for PVCs, fresh scratch for emptyDirs and secrets."""
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mapped: dict[str, Path] = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        path, volume = mount["mountPath"], volumes.get(mount["name"], {})
        if path in given:
            mapped[path] = given[path]
        elif "persistentVolumeClaim" in volume:
            raise ConfigError(f"mount {path} (PVC {volume['persistentVolumeClaim']['claimName']}) has no local "
                              f"directory: pass --mount {path}=DIR")
        else:
            local = scratch / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mapped[path] = local
    return mapped


# What a pod's process keeps of this shell's environment: where Python, its packages and the GPU libraries are, the
# GPUs it may use, the locale, and the test hooks (`_INVESTMENT_RISK_*`). A real pod never sees its submitter's
# INVESTMENT_RISK_* options or tokens.
HOST_VARIABLES = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "LANG", "LANGUAGE",
                  "LC_ALL", "LC_CTYPE")


def host_environment() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if name in HOST_VARIABLES or name.startswith("_INVESTMENT_RISK_")}
    for name in ("PYTHONPATH", "LD_LIBRARY_PATH"):  # relative entries meant this directory, not the pod's /tmp
        if name in env:
            env[name] = os.pathsep.join(os.path.abspath(p) if p else p for p in env[name].split(os.pathsep))
    return env


class ProcessRuntime:
    """Each pod as a process of this Python (the image's entrypoint is the same CLI), paths mapped to local dirs."""

    def __init__(self, job: dict[str, Any], mounts: dict[str, Path], scratch: Path) -> None:
        self.mapped = _mounts(job, mounts, scratch)
        self.tmp = str(self.mapped.get("/tmp", scratch))

    def start(self, index: int | None, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        args, env = map_to_local(args, env, self.mapped)
        # HOME and TMPDIR as the image sets them: under the pod's /tmp.
        # The working directory too, as the image's: a relative path lands in the pod's /tmp, as in a pod.
        return subprocess.Popen([sys.executable, "-m", "investment_risk", *args], cwd=self.tmp,
                                env={**host_environment(), "HOME": self.tmp, **env, "TMPDIR": self.tmp})

    def stop(self, index: int | None, process: subprocess.Popen) -> None:
        process.terminate()
        process.wait()


RUNTIMES = ("process", "docker")


def policy_action(rules: list[Any], container: str | None, code: int) -> str | None:
    """The action of the first podFailurePolicy rule whose exit codes match a failed container's (`In` or
    `NotIn` its values, for the container it names if it names one); None: counted as usual."""
    for rule in rules:
        on = rule.get("onExitCodes") if isinstance(rule, dict) else None
        if not isinstance(on, dict) or on.get("containerName") not in (None, container):
            continue
        values = set(on.get("values") or [])
        if (code in values) == (on.get("operator", "In") == "In"):
            return rule.get("action")
    return None


def run_local(manifest: Path, mounts: dict[str, Path], job_name: str | None = None,
              parallelism: int | None = None, runtime: str = "process", image: str | None = None) -> LocalResult:
    log = get_logger()
    mounts = {path: Path(local).absolute() for path, local in mounts.items()}  # pods start in their own /tmp
    docs = load_manifests(manifest)
    job = pick_job(docs, job_name, manifest)
    spec = job["spec"]
    indexed = spec.get("completionMode") == "Indexed"
    completions = int(spec.get("completions") or 1)
    width = max(1, int(parallelism or spec.get("parallelism") or 1))
    per_index = "backoffLimitPerIndex" in spec
    retries = int(spec["backoffLimitPerIndex"] if per_index else spec.get("backoffLimit", 6))  # 6: the API default
    max_failed = int(spec["maxFailedIndexes"]) if per_index and "maxFailedIndexes" in spec else None
    deadline = spec.get("activeDeadlineSeconds")
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    container = job["spec"]["template"]["spec"]["containers"][0].get("name")
    total_failures = 0
    result = LocalResult(job["metadata"]["name"], completions)
    with tempfile.TemporaryDirectory(prefix="run-local-") as scratch:
        if runtime == "docker":
            from .containers import DockerRuntime

            pods: Any = DockerRuntime(job, docs, mounts, Path(scratch), image)
        elif runtime == "process":
            pods = ProcessRuntime(job, mounts, Path(scratch))
        else:
            raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        started_at = time.monotonic()
        pending = list(range(completions))
        running: dict[int, subprocess.Popen] = {}
        attempts: dict[int, int] = {}
        try:
            while (pending or running) and not result.failed_job:
                while pending and len(running) < width:
                    index = pending.pop(0)
                    args, env = pod_spec(job, docs, index if indexed else None)
                    attempts[index] = attempts.get(index, 0) + 1
                    log.info("local_pod_start", job=result.job, index=index, attempt=attempts[index], runtime=runtime)
                    running[index] = pods.start(index, args, env)
                time.sleep(0.05)
                if deadline is not None and time.monotonic() - started_at > float(deadline):
                    # activeDeadlineSeconds: the controller stops every pod and fails the Job.
                    result.failed_job, result.fail_reason = True, "DeadlineExceeded"
                    result.failed.extend(running)
                    break
                for index, proc in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[index]
                    result.exit_codes.setdefault(index, []).append(code)
                    log.info("local_pod_done", job=result.job, index=index, exit_code=code)
                    if code == 0:
                        result.succeeded.append(index)
                        continue
                    action = policy_action(rules, container, code)
                    if action == "FailJob":
                        result.failed_job, result.fail_reason = True, "PodFailurePolicy"
                        result.failed.append(index)
                    elif action == "Ignore":  # not counted against any limit
                        attempts[index] -= 1
                        pending.append(index)
                    elif per_index and (action == "FailIndex" or attempts[index] > retries):
                        result.failed.append(index)
                        if max_failed is not None and len(result.failed) > max_failed:  # the others stop now
                            result.failed_job, result.fail_reason = True, "MaxFailedIndexesExceeded"
                    elif not per_index and (total_failures := total_failures + 1) > retries:
                        result.failed.append(index)
                        result.failed_job, result.fail_reason = True, "BackoffLimitExceeded"
                    else:
                        pending.append(index)
            if result.failed and not result.failed_job:  # every index ran; some ran out of retries
                result.failed_job, result.fail_reason = True, "FailedIndexes"
        finally:  # a failed Job, or this command stopped (SIGTERM, Ctrl-C): its pods stop too, as the controller's do
            if running:  # all at once, as the kubelet does: each may take its grace period
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(running)) as pool:
                    list(pool.map(lambda item: pods.stop(*item), running.items()))
    result.succeeded.sort()
    result.failed.sort()
    return result
