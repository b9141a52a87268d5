"""`investment-risk jobs ...`: thin commands over k8s/manifests.py, k8s/cluster.py and k8s/runlocal.py.

On a piped stdout every line is JSON: status is one object, and pod log lines are the pods' own JSON objects with
the pod's name added. `jobs render` is the one command whose stdout is a document (YAML manifests), not a log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..core.errors import ConfigError
from ..core.logs import bind, redact_event, redact_text
from ..k8s import cluster as kube
from . import output
from .options import RepeatedPath, is_url, option, stacked


# Where and how the pods run.
settings_options = stacked(
    option("--image", default="ghcr.io/investment-risk/investment-risk:0.1.0", show_default=True,
           help="Container image (pin a digest in production)."),
    option("--namespace", default="investment-risk", show_default=True),
    option("--profile", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
           help="gpu: 1 GPU per pod, tolerations, --device cuda. cpu: small CPU pods."),
    option("--queue", default=None, help="Kueue LocalQueue name (adds the kueue.x-k8s.io/queue-name label)."),
    option("--image-pull-policy", "pull_policy", type=click.Choice(["Always", "IfNotPresent", "Never"]), default=None,
           help="Default: IfNotPresent for an image pinned by digest, else Always (IfNotPresent for an image loaded "
                "into the nodes, as kind's are)."),
)

# The two PVCs (`render shared|all`, `--with-shared`): pods of one Job run on several nodes at once and share them.
storage_options = stacked(
    option("--storage-class", default=None,
           help="StorageClass of the PVCs; it must offer ReadWriteMany (default: the cluster's default class)."),
    option("--data-size", default="200Gi", show_default=True, help="Size of the data PVC (/data)."),
    option("--models-size", default="100Gi", show_default=True, help="Size of the models PVC (/models)."),
)

# What the Job does; paths are as the pod sees them (/data and /models are the PVCs), refused here as the pod's
# command would refuse them (a URL, a path given twice, an empty one), not after its image pull.
job_options = stacked(
    option("--name", default=None, help="Job name (default: investment-risk-<kind>-<UTC time>-<4 random hex>)."),
    option("--mode", type=click.Choice(["distillation", "instruction"]), default="distillation", show_default=True,
           help="train: the training mode."),
    option("--data", once=True, type=click.Path(), default="/data/splits/latest", show_default=True,
           help="train: the split directory."),
    option("--run", once=True, type=click.Path(), default=None,
           help="export: the training run directory (e.g. /models/runs/NAME)."),
    option("--base-model", default="qwen2.5-1.5b", show_default=True,
           help="train: preset or path; stage: the hub model to fetch."),
    option("--model", once=True, type=click.Path(), default="/models/current", show_default=True,
           help="score: the exported model directory."),
    option("--input", "inputs", type=RepeatedPath(), multiple=True, default=("/data/incoming",), show_default=True,
           help="score: input files, directories or globs; repeat for more."),
    option("--out", once=True, type=click.Path(), default=None,
           help="Output: the run directory (train), the model directory (export; default /models/exports/NAME) or "
                "the scoring directory (score, merge)."),
    option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="score: completions."),
    option("--parallelism", type=click.IntRange(min=1), default=None, help="score: pods at once (default: all)."),
    option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True),
    option("--schedule", default="30 2 * * *", show_default=True, help="nightly: cron schedule."),
    option("--time-zone", default="Etc/UTC", show_default=True, help="nightly: IANA time zone of the schedule."),
    option("--extra-arg", "extra_args", multiple=True, help="Passed through to the pod's command; repeatable."),
)

# How to reach the cluster (submit takes --namespace from settings_options).
connection_options = stacked(
    option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), default=None,
       help="Kubeconfig file (default: $KUBECONFIG where it names a file, else ~/.kube/config where there is one, "
            "else in-cluster config in a pod)."),
    option("--context", default=None, help="Kubeconfig context."),
)
cluster_options = stacked(connection_options, option("--namespace", default="investment-risk", show_default=True))


def _settings(image: str, namespace: str, profile: str, queue: str | None, pull_policy: str | None,
              **storage: Any) -> Any:
    from ..k8s.manifests import JobSettings

    return JobSettings(image=image, namespace=namespace, profile=profile, queue=queue, pull_policy=pull_policy,
                       **storage)


# The job options each kind's pod command takes (every kind takes --name and --extra-arg).
KIND_OPTIONS = {"stage": {"base_model"}, "train": {"mode", "data", "base_model", "out"}, "export": {"run", "out"},
                "score": {"model", "inputs", "out", "shards", "parallelism", "backend"}, "merge": {"out", "shards"},
                "nightly": {"model", "inputs", "out", "shards", "parallelism", "backend", "schedule", "time_zone"}}


def _build(kind: str, settings: Any, params: dict[str, Any]) -> dict[str, Any]:
    from ..k8s.manifests import build

    context = click.get_current_context()
    unused = [name for name in params if name not in KIND_OPTIONS[kind] | {"name", "extra_args"}
              and context.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if unused:  # `render train --shards 8` rendered a Job without it, and said nothing
        flag = {param.name: param.opts[0] for param in context.command.params}
        taken = sorted(flag[name] for name in KIND_OPTIONS[kind] | {"name", "extra_args"})
        raise ConfigError(f"{', '.join(flag[name] for name in unused)}: not an option of a {kind} Job (it takes "
                          f"{', '.join(taken)})")
    params["inputs"] = tuple(params["inputs"])
    params["extra_args"] = tuple(params["extra_args"])
    manifest = build(kind, settings, **params)
    check_pod_command(manifest, context.find_root().command, params["extra_args"])
    return manifest


def check_pod_command(manifest: dict[str, Any], cli: Any, extra_args: tuple[str, ...] = ()) -> None:
    """Parse the pod's command as the image's CLI will, so that what it would refuse is refused now, not after the
    image pull: an unknown option, one given twice (by the Job and again by --extra-arg, where the last would
    silently win), a URL, a value of the wrong kind; and a relative path, which in a pod lands in its /tmp and is
    deleted with it (the Job still succeeds). Existence is the pod's to check: its volumes are not here. `cli`:
    the root command group, the image's entry point."""
    job = manifest["spec"].get("jobTemplate", manifest)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    command = cli.commands[args[0]]
    context = click.Context(command, info_name=args[0])
    try:
        values, extra, order = command.make_parser(context).parse_args(list(args[1:]))
        if extra:
            raise click.UsageError(f"unexpected argument {extra[0]!r}")
        # an option the Job sets, set again by --extra-arg, would silently win (twice in --extra-arg alone is the
        # CLI's override: the last one)
        theirs = command.make_parser(context).parse_args(list(extra_args))[2] if extra_args else []
        for param in dict.fromkeys(order):
            if not param.multiple and param.nargs != -1 and 0 < theirs.count(param) < order.count(param):
                raise click.UsageError(f"{param.opts[0]} is set by the Job itself; --extra-arg cannot set it again")
            value = values.get(param.name)
            if not isinstance(value, (str, bool, list, tuple)):  # an argument not given (Click's unset marker)
                continue
            label = param.opts[0] if isinstance(param, click.Option) else "the argument"
            if not isinstance(param.type, click.Path):
                param.type_cast_value(context, value)
                continue
            for path in value if param.multiple or param.nargs == -1 else (value,):
                if is_url(path):
                    raise click.UsageError(f"{label} {path}: a URL; a pod reads its mounted volumes")
                if not path.startswith("/"):
                    raise click.UsageError(f"{label} {path}: a relative path, which in the pod is under its "
                                           "/tmp and deleted with it; give the path as the pod sees it (/data/..., "
                                           "/models/...)")
    except click.ClickException as exc:
        raise ConfigError(f"the pod's command `investment-risk {args[0]}`: {exc.format_message()}") from None


@click.group("jobs")
def jobs_group() -> None:
    """Kubernetes Jobs: render manifests, submit and follow them, or run their pods here."""
    bind(stage="jobs")


@jobs_group.command("render")
@click.argument("kind", type=click.Choice(["all", "shared", "stage", "train", "export", "score", "merge", "nightly"]))
@settings_options
@storage_options
@job_options
@option("--with-shared", is_flag=True, help="Also print the namespace, PVCs, ConfigMap and RBAC the Job needs.")
def render_command(kind: str, image: str, namespace: str, profile: str, queue: str | None, pull_policy: str | None,
                   storage_class: str | None, data_size: str, models_size: str, with_shared: bool,
                   **params: Any) -> None:
    """Print manifests as YAML: `all` is what k8s/base holds (for `kubectl apply`), a Job kind one Job (for
    `kubectl create`, or `jobs run-local`)."""
    from ..k8s.manifests import default_base, shared_resources, to_yaml

    settings = _settings(image, namespace, profile, queue, pull_policy, storage_class=storage_class,
                         data_size=data_size, models_size=models_size)
    context = click.get_current_context()
    given = [name for name in (*params, "with_shared")
             if context.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if kind in ("all", "shared") and given:  # the base's Jobs take their defaults: say so, stdout is the YAML
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        click.echo(f"warning: {flags} ignored: options of one Job; `jobs render {kind}` takes the image, namespace, "
                   "profile, queue, pull policy and storage options only", err=True)
    if kind == "all":
        docs = [d for file_docs in default_base(settings).values() for d in file_docs]
    elif kind == "shared":
        docs = shared_resources(settings)
    else:
        docs = [*(shared_resources(settings) if with_shared else []), _build(kind, settings, params)]
    click.echo(to_yaml(docs), nl=False)


@jobs_group.command("submit")
@click.argument("kind", type=click.Choice(["stage", "train", "export", "score", "merge"]))
@settings_options
@job_options
@connection_options
@option("--wait", is_flag=True, help="Follow the pods' logs until the Job finishes; exit with what it meant.")
@option("--timeout", type=click.FloatRange(min=1), default=None, help="With --wait: give up after this many seconds.")
@option("--poll-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
def submit_command(kind: str, image: str, namespace: str, profile: str, queue: str | None, pull_policy: str | None,
                   kubeconfig: Path | None, context: str | None, wait: bool, timeout: float | None,
                   poll_seconds: float, **params: Any) -> None:
    """Create a staging, training, export, scoring or merge Job."""
    manifest = _build(kind, _settings(image, namespace, profile, queue, pull_policy), params)
    cluster = kube.connect(namespace, kubeconfig, context)
    name = kube.submit(cluster, manifest)
    output.summary(f"job {name} created in namespace {namespace}", "job_created", job=name, namespace=namespace,
                   kind=kind)
    if wait:
        _follow(cluster, name, timeout, poll_seconds)


@jobs_group.command("wait")
@click.argument("name")
@cluster_options
@option("--timeout", type=click.FloatRange(min=1), default=None, help="Give up after this many seconds.")
@option("--poll-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
def wait_command(name: str, kubeconfig: Path | None, context: str | None, namespace: str, timeout: float | None,
                 poll_seconds: float) -> None:
    """Follow a Job already submitted (by another shell, or before a lost connection) as `submit --wait` does."""
    _follow(kube.connect(namespace, kubeconfig, context), name, timeout, poll_seconds)


def _follow(cluster: Any, name: str, timeout: float | None, poll_seconds: float) -> None:
    def show(pod: str, line: str) -> None:
        _echo_log_line(pod, line, raw=False)

    status = kube.wait(cluster, name, show, poll_seconds, timeout)
    code = kube.exit_code_for(status)
    output.summary(f"job {name}: {status['state']} (succeeded {status['succeeded']}, failed {status['failed']})",
                   "job_finished", job=name, state=status["state"], succeeded=status["succeeded"],
                   failed=status["failed"], exit_code=code)
    if code:
        raise click.exceptions.Exit(code)


@jobs_group.command("status")
@click.argument("name")
@cluster_options
@option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(name: str, kubeconfig: Path | None, context: str | None, namespace: str, as_json: bool) -> None:
    """A Job's state, counts, conditions and pods."""
    status = kube.job_status(kube.connect(namespace, kubeconfig, context), name)
    if as_json or not output.on_terminal():
        click.echo(json.dumps(status, indent=2 if output.on_terminal() else None))
        return
    click.echo(f"{name}: {status['state']}  completions {status['succeeded']}/{status['completions']}  "
               f"active {status['active']}  failed {status['failed']}")
    for key in ("completed_indexes", "failed_indexes"):
        if status[key]:
            click.echo(f"{key.replace('_', ' ')}: {status[key]}")
    for c in status["conditions"]:
        click.echo(f"condition {c['type']}: {c['reason'] or ''} {c['message'] or ''}".rstrip())
    for pod in status["pods"]:
        waiting = pod["waiting"] or {}
        click.echo(f"pod {pod['name']}: {pod['phase']}"
                   + (f" exit {pod['exit_code']}" if pod["exit_code"] is not None else "")
                   + (f" waiting: {waiting['reason']}" if waiting.get("reason") else "")
                   + (f" ({waiting['message']})" if waiting.get("message") else ""))


@jobs_group.command("logs")
@click.argument("name")
@cluster_options
@option("--tail", type=click.IntRange(min=1), default=None, help="Last N lines of each pod.")
@option("--raw", is_flag=True, help="Print the JSON lines as they are.")
def logs_command(name: str, kubeconfig: Path | None, context: str | None, namespace: str, tail: int | None,
                 raw: bool) -> None:
    """Every pod's log, the structlog JSON pretty-printed."""
    lines = kube.pod_logs(kube.connect(namespace, kubeconfig, context), name, tail)
    for pod, line in lines:
        _echo_log_line(pod, line, raw)
    if not lines:  # the Job is there (else exit 2): its pods have not started, or have gone
        output.summary(f"job {name}: no pod has a log yet (`jobs status {name}` says why)", "no_pod_logs", job=name)


def _echo_log_line(pod: str, line: str, raw: bool) -> None:
    """A pod's log line: readable (or raw) on a terminal; on a pipe, its JSON object with the pod's name. Redacted
    as this process's own lines are: a pod's stderr, a library's warning or a traceback may carry a secret."""
    if output.on_terminal():
        click.echo(redact_text(f"{pod}: {line if raw else kube.pretty_log_line(line)}"))
        return
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"event": "pod_output", "line": line}
    click.echo(json.dumps({"pod": pod, **redact_event(event)}))


@jobs_group.command("cancel")
@click.argument("name")
@cluster_options
def cancel_command(name: str, kubeconfig: Path | None, context: str | None, namespace: str) -> None:
    """Delete a Job and its pods (background propagation)."""
    kube.cancel(kube.connect(namespace, kubeconfig, context), name)
    output.summary(f"job {name} cancelled", "job_cancelled", job=name, namespace=namespace)


def _mount(value: str) -> tuple[str, Path]:
    path, sep, local = value.partition("=")
    if not sep or not path.startswith("/") or not local:
        raise ConfigError(f"--mount {value!r} must be POD_PATH=LOCAL_DIR, e.g. /data=./data")
    return path.rstrip("/") or "/", Path(local)


@jobs_group.command("run-local")
@option("--manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
        help="A rendered manifest file (`jobs render KIND --with-shared`).")
@option("--job", "job_name", default=None, help="The Job to run when the file holds several.")
@option("--mount", "mounts", multiple=True, required=True, help="POD_PATH=LOCAL_DIR for each PVC mount; repeatable.")
@option("--parallelism", type=click.IntRange(min=1), default=None, help="Override the Job's parallelism.")
@option("--runtime", type=click.Choice(["process", "docker"]), default="process", show_default=True,
        help="process: each pod as a process of this Python. docker: each pod as a container of the Job's image, with "
             "its securityContext, volumes and limits.")
@option("--image", default=None, help="With --runtime docker: run this image instead of the manifest's.")
def run_local_command(manifest: Path, job_name: str | None, mounts: tuple[str, ...], parallelism: int | None,
                      runtime: str, image: str | None) -> None:
    """Run a Job's pods here, one per completion index, with the env and paths a pod would get."""
    from ..k8s.runlocal import run_local

    mapped = dict(_mount(m) for m in mounts)
    result = run_local(manifest, mapped, job_name, parallelism, runtime, image)
    output.summary(f"job {result.job}: {len(result.succeeded)}/{result.completions} indexes succeeded"
                   + (f", failed {result.failed}" if result.failed else "")
                   + (f" ({result.fail_reason})" if result.fail_reason else ""),
                   "local_job_done", job=result.job, completions=result.completions, succeeded=result.succeeded,
                   failed=result.failed, fail_reason=result.fail_reason)
    if not result.ok:
        raise click.exceptions.Exit(2 if result.fail_reason == "PodFailurePolicy" else 1)
