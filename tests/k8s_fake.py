"""A kmock Kubernetes emulator on a real localhost port, driven from synchronous tests.

kmock is asyncio-based: it runs on its own loop in a thread; the store is changed on that loop via `call`.
It ignores label selectors and does not serve pod logs, so both are added as routes here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
import time
from typing import Any, Callable

import kmock

WAITING = "<container waiting to start>"


class FakeCluster:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator: Any = None
        self.port: int | None = None
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.log_stamps: dict[tuple[str, str], list[float]] = {}  # each line's time, as the kubelet records it
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surface start-up errors to the test
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = kmock.KubernetesEmulator()  # made on its loop: it holds asyncio primitives
        async with emulator, kmock.Server(emulator) as server:
            self.emulator, self.port = emulator, server.port
            emulator.resources.load_bundled()
            self._install_routes(emulator)
            self._ready.set()
            await self._stop.wait()

    def _install_routes(self, emulator: Any) -> None:
        def list_selected(request: Any) -> dict:
            wanted = dict(term.split("=", 1) for term in request.params["labelSelector"].split(",") if "=" in term)
            items = [obj.raw for (resource, namespace, _), obj in list(emulator.objects.items())
                     if resource == request.resource and not obj.deleted
                     and (request.namespace is None or namespace == request.namespace)
                     and all(((obj.raw.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in wanted.items())]
            return {"metadata": {"resourceVersion": "1"}, "items": items}

        def serve_log(request: Any) -> Any:
            text = self.pod_logs.get((request.namespace, request.name))
            if text is None:
                return kmock.KubernetesObjectNotFoundError()
            if text == WAITING:  # what the API server says while the container is pulling or pending
                return kmock.KubernetesError(status=400, reason="BadRequest",
                                             message=f'container "main" in pod "{request.name}" is waiting to start')
            lines = _records(text)
            stamps = self.log_stamps.get((request.namespace, request.name)) or [time.time()] * len(lines)
            if "sinceSeconds" in request.params:
                since = time.time() - float(request.params["sinceSeconds"])
                lines, stamps = [ln for ln, t in zip(lines, stamps) if t >= since], [t for t in stamps if t >= since]
            if "tailLines" in request.params:
                keep = int(request.params["tailLines"])
                lines, stamps = lines[len(lines) - keep:], stamps[len(stamps) - keep:]
            if request.params.get("timestamps") == "true":
                lines = [f"{rfc3339_nano(t)} {ln}" for ln, t in zip(lines, stamps)]
            return "".join(f"{ln}\n" for ln in lines).encode()

        emulator[kmock.action.LIST, lambda request: "labelSelector" in request.params] << list_selected
        emulator[kmock.resource("v1/pods"), kmock.subresource("log"), "get"] << {"Content-Type": "text/plain"} << serve_log

    def start(self) -> "FakeCluster":
        self._thread.start()
        self._ready.wait(15)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (where the store may be changed) and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Any, namespace: str = "investment-risk") -> Any:
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    # What no controller computes here: the Job's status and its pods.
    def seed_status(self, namespace: str, name: str, status: dict) -> None:
        self.call(lambda: self.emulator.objects["batch/v1/jobs", namespace, name].patch({"status": status}))

    def seed_pod(self, namespace: str, job: str, pod: str, phase: str, log: str, exit_code: int | None = None,
                 index: int | None = None, waiting: str | None = None) -> None:
        def seed() -> None:
            status: dict = {"phase": phase}
            state = ({"terminated": {"exitCode": exit_code}} if exit_code is not None else
                     {"waiting": {"reason": waiting, "message": f"{waiting} for the test"}} if waiting else None)
            if state:
                status["containerStatuses"] = [{"name": "main", "image": "x", "imageID": "", "ready": False,
                                                "restartCount": 0, "state": state}]
            annotations = {"batch.kubernetes.io/job-completion-index": str(index)} if index is not None else {}
            self.emulator.objects["v1/pods", namespace, pod] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace, "annotations": annotations,
                             "labels": {"batch.kubernetes.io/job-name": job, "job-name": job}},
                "spec": {"containers": [{"name": "main", "image": "x"}]}, "status": status}
            self.pod_logs[(namespace, pod)] = log
            self.log_stamps[(namespace, pod)] = _stamps(len(_records(log)))
        self.call(seed)

    def append_log(self, namespace: str, pod: str, text: str, rotate: bool = False) -> None:
        """New lines in a pod's log; `rotate`: the kubelet rotated the file first, so only the new lines remain."""
        def append() -> None:
            key = (namespace, pod)
            old, stamps = ("", []) if rotate else (self.pod_logs[key], self.log_stamps[key])
            self.pod_logs[key] = old + text
            self.log_stamps[key] = stamps + _stamps(len(_records(text)))
        self.call(append)

    def requests(self, method: str, resource: str) -> list:
        return list(self.emulator[method, kmock.resource(resource)])


def _records(text: str) -> list[str]:
    """A log's records, as the kubelet keeps them: ended by "\\n" only (a progress bar's "\\r" is inside one)."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _stamps(count: int) -> list[float]:
    now = time.time()
    return [now + i * 1e-6 for i in range(count)]


def rfc3339_nano(t: float) -> str:
    """As the kubelet writes a line's time: nanoseconds with trailing zeros trimmed (so the strings do not sort)."""
    whole = dt.datetime.fromtimestamp(int(t), dt.timezone.utc)
    fraction = f"{round((t - int(t)) * 1e9):09d}"[:9].rstrip("0")
    return f"{whole:%Y-%m-%dT%H:%M:%S}" + (f".{fraction}" if fraction else "") + "Z"
