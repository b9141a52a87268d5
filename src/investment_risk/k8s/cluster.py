"""Talking to a cluster with the official client: submit, wait, status, logs, cancel.

API failures become the package's errors in one place (`_api_errors`): an unreachable API server is retryable
(exit 1); no cluster configured, forbidden, not found and conflicts are configuration problems (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, RetryableError

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class Cluster:
    batch: Any
    core: Any
    namespace: str


def connect(namespace: str, kubeconfig: Path | None = None, context: str | None = None) -> Cluster:
    """In-cluster config inside a pod, else the kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config)."""
    import os

    from kubernetes import client, config

    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, context=context)
    except (config.ConfigException, FileNotFoundError, OSError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ConfigError(f"no cluster configured ({where}: {exc}); pass --kubeconfig, set KUBECONFIG, "
                          "or run inside a pod") from None
    api = client.ApiClient()
    return Cluster(client.BatchV1Api(api), client.CoreV1Api(api), namespace)


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        reason = _reason(exc)
        if exc.status in (401, 403):
            raise ConfigError(f"{what}: forbidden ({reason}); the submitter needs the Role in k8s/ "
                              "(jobs, pods, pods/log)") from None
        if exc.status == 404:
            raise ConfigError(f"{what}: not found ({reason})") from None
        if exc.status == 409:
            raise ConfigError(f"{what}: already exists ({reason}); choose another --name") from None
        if exc.status == 422:
            raise ConfigError(f"{what}: rejected by the API server ({reason})") from None
        raise RetryableError(f"{what}: API server answered {exc.status} ({reason})") from None
    except HTTPError as exc:
        raise RetryableError(f"{what}: cannot reach the cluster ({exc.__class__.__name__}: {exc})") from None


def _reason(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def submit(cluster: Cluster, manifest: dict[str, Any]) -> str:
    name = manifest["metadata"]["name"]
    with _api_errors(f"create job {name} in namespace {cluster.namespace}"):
        cluster.batch.create_namespaced_job(cluster.namespace, manifest)
    return name


def job_status(cluster: Cluster, name: str) -> dict[str, Any]:
    """The Job's counts and conditions, and each pod's phase and exit code."""
    with _api_errors(f"job {name} in namespace {cluster.namespace}"):
        job = cluster.batch.read_namespaced_job(name, cluster.namespace)
        pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
    from kubernetes.client import V1JobStatus

    status, spec = job.status or V1JobStatus(), job.spec  # a Job the controller has not seen yet has no status
    conditions = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
                  for c in (status.conditions or []) if c.status == "True"]
    finished = next((c["type"] for c in conditions if c["type"] in ("Complete", "Failed")), None)
    return {
        "name": name, "namespace": cluster.namespace,
        "completions": spec.completions, "parallelism": spec.parallelism, "completion_mode": spec.completion_mode,
        "active": status.active or 0, "succeeded": status.succeeded or 0, "failed": status.failed or 0,
        "completed_indexes": status.completed_indexes, "failed_indexes": status.failed_indexes,
        "conditions": conditions, "state": finished or ("Running" if status.active else "Pending"),
        "pods": [_pod_summary(p) for p in pods],
    }


def _pod_summary(pod: Any) -> dict[str, Any]:
    annotations = pod.metadata.annotations or {}
    exit_code = None
    for state in (pod.status.container_statuses or []) if pod.status else []:
        if state.state and state.state.terminated:
            exit_code = state.state.terminated.exit_code
    return {"name": pod.metadata.name, "phase": pod.status.phase if pod.status else None, "exit_code": exit_code,
            "index": annotations.get("batch.kubernetes.io/job-completion-index")}


def exit_code_for(status: dict[str, Any]) -> int:
    """What a finished Job means for the submitter: 0 done, 2 failed on bad input (FailJob on exit 2), else 1."""
    if status["state"] == "Complete":
        return 0
    failed = next((c for c in status["conditions"] if c["type"] == "Failed"), None)
    if failed and failed.get("reason") == "PodFailurePolicy":
        return 2
    return 1


def pod_logs(cluster: Cluster, name: str, tail: int | None = None) -> list[tuple[str, str]]:
    """(pod name, log text) for every pod of the Job that has a log yet, in name order."""
    with _api_errors(f"logs of job {name} in namespace {cluster.namespace}"):
        pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
    return _read_logs(cluster, name, [p.metadata.name for p in pods], tail)


def _read_logs(cluster: Cluster, name: str, pods: list[str], tail: int | None = None) -> list[tuple[str, str]]:
    from kubernetes.client.rest import ApiException

    out = []
    with _api_errors(f"logs of job {name} in namespace {cluster.namespace}"):
        for pod in sorted(pods):
            kwargs = {"tail_lines": tail} if tail else {}
            try:
                text = cluster.core.read_namespaced_pod_log(pod, cluster.namespace, **kwargs)
            except ApiException as exc:
                # 400: the container is still waiting to start (pulling, pending); 404: the pod just went away.
                if exc.status in (400, 404):
                    continue
                raise
            out.append((pod, text))
    return out


def cancel(cluster: Cluster, name: str) -> None:
    """Delete the Job; Background propagation lets the garbage collector take its pods too."""
    from kubernetes import client

    with _api_errors(f"cancel job {name} in namespace {cluster.namespace}"):
        cluster.batch.delete_namespaced_job(name, cluster.namespace,
                                            body=client.V1DeleteOptions(propagation_policy="Background"))


def wait(cluster: Cluster, name: str, on_line: Callable[[str, str], None], poll_s: float = 5.0,
         timeout_s: float | None = None) -> dict[str, Any]:
    """Poll until the Job completes or fails, passing each new log line of each pod to on_line(pod, line)."""
    seen: dict[str, int] = {}
    started = time.monotonic()
    while True:
        status = job_status(cluster, name)
        for pod, text in _read_logs(cluster, name, [p["name"] for p in status["pods"]]):  # pods listed once
            lines = text.splitlines()
            for line in lines[seen.get(pod, 0):]:
                on_line(pod, line)
            seen[pod] = len(lines)
        if status["state"] in ("Complete", "Failed"):
            return status
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise RetryableError(f"job {name}: still {status['state']} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def pretty_log_line(line: str) -> str:
    """One structlog JSON line as `time level [shard] event key=value ...`; other lines unchanged."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "event" not in record:
        return line
    head = [str(record.pop("timestamp", ""))[:19].replace("T", " "), f"{str(record.pop('level', '')).upper():<7}"]
    for key in ("stage", "shard"):
        if key in record:
            head.append(f"{key}={record.pop(key)}")
    record.pop("run_id", None)
    event = record.pop("event")
    rest = " ".join(f"{k}={v}" for k, v in record.items())
    return " ".join(x for x in [*head, event, rest] if x)
