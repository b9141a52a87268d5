"""Talking to a cluster with the official client: submit, wait, status, logs, cancel.

API failures become the package's errors in one place (`_api_errors`): an unreachable API server is retryable
(exit 1); no cluster configured, forbidden, not found and conflicts are configuration problems (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import re
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
    deadline: float | None = None  # time.monotonic() by which `wait` must end: no call may wait past it

    def request_timeout(self) -> tuple[float, float]:
        if self.deadline is None:
            return REQUEST_TIMEOUT
        left = max(1.0, self.deadline - time.monotonic())
        return min(REQUEST_TIMEOUT[0], left), min(REQUEST_TIMEOUT[1], left)


# Every API call's (connect, read) timeout: a server that accepts and never answers would hold a command, and a
# `jobs wait --timeout`, for ever. Failed calls are not retried inside the client (its retries printed a warning
# each): `wait` rides out failed polls itself, and one command's failure is one line, exit 1.
REQUEST_TIMEOUT = (10.0, 60.0)


def connect(namespace: str, kubeconfig: Path | None = None, context: str | None = None) -> Cluster:
    """As kubectl chooses: the kubeconfig named (--kubeconfig, then $KUBECONFIG), else ~/.kube/config where there is
    one, else in-cluster config inside a pod."""
    import os

    import yaml
    from kubernetes import client, config

    env_files = [f for f in os.environ.get("KUBECONFIG", "").split(os.pathsep) if f]
    # As client-go: a $KUBECONFIG of files none of which exists is no config, and a pod's own one is used
    named = kubeconfig is not None or any(Path(f).exists() for f in env_files)
    home = Path(os.path.expanduser(config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION))
    where = str(kubeconfig or os.environ.get("KUBECONFIG") or home)
    try:
        if not named and not home.exists() and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            where = "in-cluster config"
            config.load_incluster_config()
        else:
            # $KUBECONFIG read now: the client reads it once, when it is imported (may be a list, merged as kubectl does)
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG"),
                                    context=context)
    except (config.ConfigException, OSError) as exc:
        if context is not None and f"name {context}" in str(exc):
            raise ConfigError(f"--context {context}: no such context in {where}") from None
        raise ConfigError(f"no cluster configured ({where}: {exc}); pass --kubeconfig, set KUBECONFIG, "
                          "or run inside a pod") from None
    except (yaml.YAMLError, TypeError, AttributeError, KeyError, ValueError) as exc:  # the client's own parse
        raise ConfigError(f"{where}: not a kubeconfig ({exc.__class__.__name__}: {exc})") from None
    configuration = client.Configuration.get_default_copy()
    configuration.retries = False
    api = client.ApiClient(configuration)
    return Cluster(client.BatchV1Api(api), client.CoreV1Api(api), namespace)


@contextlib.contextmanager
def _api_errors(what: str, cluster: Cluster) -> Iterator[None]:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        reason = _reason(exc)
        if exc.status == 401:
            raise ConfigError(f"{what}: unauthorized ({reason}); the cluster refused the credentials, or they have "
                              "expired: log in again or renew the token") from None
        if exc.status == 403:
            raise ConfigError(f"{what}: forbidden ({reason}); the submitter needs the Role in k8s/ "
                              "(jobs, pods, pods/log)") from None
        if exc.status == 404:
            raise NotFoundError(f"{what}: not found ({reason})") from None
        if exc.status == 409:
            raise ConfigError(f"{what}: already exists ({reason}); choose another --name, or follow that Job with "
                              "`jobs wait NAME`") from None
        if exc.status in (400, 422):  # a manifest or request the server refuses (schema, admission webhook)
            raise ConfigError(f"{what}: rejected by the API server ({reason})") from None
        raise RetryableError(f"{what}: API server answered {exc.status} ({reason})") from None
    except HTTPError as exc:
        host = cluster.batch.api_client.configuration.host
        raise RetryableError(f"{what}: cannot reach the cluster at {host} ({unreachable_reason(exc)})") from None


class NotFoundError(ConfigError):
    """The API server has no such object (exit 2 where it was named; a Job followed until then was deleted)."""


def unreachable_reason(exc: Exception) -> str:
    """Why a request got no answer, in a few words: "connection refused", "no answer in time"."""
    from urllib3.exceptions import ReadTimeoutError

    cause = getattr(exc, "reason", None) or exc
    if isinstance(cause, ReadTimeoutError) or isinstance(exc, ReadTimeoutError):
        return "no answer in time"
    text = str(cause)
    if match := re.search(r"\[Errno -?\d+\] ([^')\]]+)", text):
        return match.group(1).strip().lower()
    if "timed out" in text.lower():
        return "no connection in time"
    return f"{cause.__class__.__name__}"


def _reason(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def submit(cluster: Cluster, manifest: dict[str, Any]) -> str:
    name = manifest["metadata"]["name"]
    with _api_errors(f"create job {name} in namespace {cluster.namespace}", cluster):
        cluster.batch.create_namespaced_job(cluster.namespace, manifest, _request_timeout=cluster.request_timeout())
    return name


def job_status(cluster: Cluster, name: str) -> dict[str, Any]:
    """The Job's counts and conditions, and each pod's phase and exit code."""
    with _api_errors(f"job {name} in namespace {cluster.namespace}", cluster):
        job = cluster.batch.read_namespaced_job(name, cluster.namespace, _request_timeout=cluster.request_timeout())
        pods = _job_pods(cluster, name)
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
    exit_code, waiting = None, None
    for state in (pod.status.container_statuses or []) if pod.status else []:
        if state.state and state.state.terminated:
            exit_code = state.state.terminated.exit_code
        if state.state and state.state.waiting:  # ErrImagePull, ImagePullBackOff, CreateContainerConfigError...
            waiting = {"reason": state.state.waiting.reason, "message": state.state.waiting.message}
    return {"name": pod.metadata.name, "phase": pod.status.phase if pod.status else None, "exit_code": exit_code,
            "index": annotations.get("batch.kubernetes.io/job-completion-index"), "waiting": waiting}


def exit_code_for(status: dict[str, Any]) -> int:
    """What a finished Job means for the submitter: 0 done, 2 failed on bad input (FailJob on exit 2), else 1."""
    if status["state"] == "Complete":
        return 0
    failed = next((c for c in status["conditions"] if c["type"] == "Failed"), None)
    if failed and failed.get("reason") == "PodFailurePolicy":
        return 2
    return 1


def pod_logs(cluster: Cluster, name: str, tail: int | None = None) -> list[tuple[str, str]]:
    """(pod name, line) for each log line of every pod of the Job that has a log yet, pods in name order: the last
    `tail` lines of each, or all."""
    with _api_errors(f"logs of job {name} in namespace {cluster.namespace}", cluster):
        # A Job that does not exist is "not found" (exit 2), not a silent empty log
        cluster.batch.read_namespaced_job(name, cluster.namespace, _request_timeout=cluster.request_timeout())
        pods = _job_pods(cluster, name)
    return list(LogFollower(tail).new_lines(cluster, name, [p.metadata.name for p in pods]))


def _job_pods(cluster: Cluster, name: str) -> list[Any]:
    return cluster.core.list_namespaced_pod(cluster.namespace, label_selector=f"{JOB_NAME_LABEL}={name}",
                                            _request_timeout=cluster.request_timeout()).items


def cancel(cluster: Cluster, name: str) -> None:
    """Delete the Job; Background propagation lets the garbage collector take its pods too."""
    from kubernetes import client

    with _api_errors(f"cancel job {name} in namespace {cluster.namespace}", cluster):
        cluster.batch.delete_namespaced_job(name, cluster.namespace, _request_timeout=cluster.request_timeout(),
                                            body=client.V1DeleteOptions(propagation_policy="Background"))


# Consecutive failed polls (an API server restarting, a dropped connection) that `wait` rides out before it gives
# up: about a minute at the default 5 s. The Job runs on regardless; exit 1 then means "lost", `jobs wait` resumes.
POLL_FAILURES = 12
# Each later read asks only for the lines since the last one, plus this margin (dedup drops what it repeats).
LOG_MARGIN_S = 60


class LogFollower:
    """Each pod's new log lines, read with the kubelet's timestamps: a line is new when it is later than the last one
    passed on (or as late, beyond those already passed on), so a line is passed on once, the first lines of a
    rotated file included, and a read asks only for the last minutes of the log rather than all of it again. (The
    kubelet serves only the current file: lines written and rotated away between two reads are gone for any
    client.) A pod whose log cannot be read this time is skipped and read again at the next poll."""

    def __init__(self, tail: int | None = None) -> None:
        self.tail = tail  # the first read of a pod: its last `tail` lines only
        self.last: dict[str, tuple[tuple[str, int], int]] = {}  # pod -> (latest stamp, lines seen at that stamp)
        self.read_at: dict[str, float] = {}

    def new_lines(self, cluster: Cluster, name: str, pods: list[str]) -> Iterator[tuple[str, str]]:
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        from ..core.logs import get_logger

        deadline = getattr(cluster, "deadline", None)
        for pod in sorted(pods):
            if deadline is not None and time.monotonic() >= deadline:  # `wait --timeout` is up: the rest can wait
                return
            kwargs: dict[str, Any] = {"timestamps": True}
            if pod in self.read_at:
                kwargs["since_seconds"] = int(time.monotonic() - self.read_at[pod]) + LOG_MARGIN_S
            elif self.tail:
                kwargs["tail_lines"] = self.tail
            started = time.monotonic()
            try:
                text = cluster.core.read_namespaced_pod_log(pod, cluster.namespace,
                                                            _request_timeout=cluster.request_timeout(), **kwargs)
            except ApiException as exc:
                if exc.status not in (400, 404):  # 400, 404: still waiting to start (pulling, pending), or just gone
                    # A node the API server cannot reach (NotReady after a spot reclaim): the Job's state still counts
                    get_logger().warning("pod_log_unreadable", job=name, pod=pod, status=exc.status,
                                         reason=_reason(exc))
                continue
            except HTTPError as exc:
                get_logger().warning("pod_log_unreadable", job=name, pod=pod, reason=unreachable_reason(exc))
                continue
            self.read_at[pod] = started
            # Records end at "\n" only: a progress bar's "\r" stays inside its line.
            yield from ((pod, line) for line in self._unseen(pod, text.split("\n")))

    def _unseen(self, pod: str, lines: list[str]) -> Iterator[str]:
        latest, at_latest = self.last.get(pod, (("", -1), 0))
        skip, passing = at_latest, False
        for line in lines:
            raw, _, message = line.partition(" ")
            if not _STAMPED.match(raw):  # not a record (the empty rest after the last "\n"): goes with the last one
                if line and passing:
                    yield line
                continue
            stamp = _stamp(raw)
            passing = not (stamp < latest or (stamp == latest and skip > 0))
            if not passing:
                skip -= stamp == latest
                continue
            if stamp > latest:
                latest, at_latest, skip = stamp, 0, 0
            at_latest += 1
            yield message
        self.last[pod] = (latest, at_latest)


_STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _stamp(text: str) -> tuple[str, int]:
    """An RFC 3339 timestamp as (seconds, nanoseconds), comparable: the kubelet trims the fraction's trailing
    zeros, so the strings themselves do not sort."""
    seconds, _, fraction = text.rstrip("Z").partition(".")
    return seconds, int(fraction.ljust(9, "0")[:9]) if fraction.isdigit() else 0


def wait(cluster: Cluster, name: str, on_line: Callable[[str, str], None], poll_s: float = 5.0,
         timeout_s: float | None = None) -> dict[str, Any]:
    """Poll until the Job completes or fails, passing each new log line of each pod to on_line(pod, line). A pod
    that cannot start (an image that does not pull, a missing Secret) is reported once per reason; a failed poll is
    retried up to POLL_FAILURES times in a row."""
    from ..core.logs import get_logger

    log, follower = get_logger(), LogFollower()
    reported: set[tuple[str, str]] = set()  # (pod, reason): ErrImagePull and ImagePullBackOff alternate
    failures, state, seen = 0, "unknown", None
    started = time.monotonic()
    if timeout_s is not None:
        cluster.deadline = started + timeout_s
    while True:
        try:
            status = job_status(cluster, name)
            for pod, line in follower.new_lines(cluster, name, [p["name"] for p in status["pods"]]):  # pods listed once
                on_line(pod, line)
            failures, state, seen = 0, status["state"], status
        except NotFoundError:
            if seen is None:  # never there: a wrong name
                raise
            # cancelled (`jobs cancel`, kubectl delete) while followed: it will not finish
            log.warning("job_deleted", job=name)
            return {**seen, "state": "Deleted"}
        except RetryableError as exc:
            failures += 1
            if failures >= POLL_FAILURES:
                raise RetryableError(f"{exc} ({failures} polls in a row; the Job itself may still be running: "
                                     f"`jobs wait {name}` follows it again)") from None
            log.warning("poll_failed", job=name, error=str(exc), failures=failures)
            status = None
        for pod in status["pods"] if status else []:
            reason = (pod["waiting"] or {}).get("reason")
            if reason not in (None, "ContainerCreating", "PodInitializing") and (pod["name"], reason) not in reported:
                log.warning("pod_waiting", job=name, pod=pod["name"], reason=reason, message=pod["waiting"]["message"])
                reported.add((pod["name"], reason))
        if status and status["state"] in ("Complete", "Failed"):
            return status
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise RetryableError(f"job {name}: still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s if timeout_s is None else max(0.0, min(poll_s, started + timeout_s - time.monotonic())))


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
