"""Kubernetes manifests for training, sharded scoring, the metrics merge and the nightly CronJob.

Pure functions from validated settings to plain dicts: `jobs render` prints them, `jobs submit` sends them,
`jobs run-local` runs their pods' commands here, and k8s/base is their output for the default settings (a test keeps
it in step). Every pod runs the restricted Pod Security profile with a read-only root filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import ConfigError

APP = "investment-risk"
UID = 10001  # the image's numeric non-root user
DATA_MOUNT, MODELS_MOUNT, CACHE_MOUNT = "/data", "/models", "/cache"
HF_TOKEN_DIR = "/var/run/secrets/huggingface"
SETTINGS_CONFIGMAP = f"{APP}-settings"
HF_TOKEN_SECRET = f"{APP}-hf-token"
RUNNER_SA, SUBMITTER_SA = f"{APP}-runner", f"{APP}-submitter"
DATA_PVC, MODELS_PVC = f"{APP}-data", f"{APP}-models"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DAY = 86400
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_FACTORS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any, what: str) -> float:
    """A Kubernetes quantity ("2", "500m", "8Gi") as a number (cores, or bytes)."""
    match = _QUANTITY.match(str(value))
    if not match:
        raise ConfigError(f"{what}: {value!r} is not a Kubernetes quantity")
    number, unit = float(match.group(1)), match.group(2)
    return number / 1000 if unit == "m" else number * _FACTORS[unit]


@dataclass(frozen=True)
class Profile:
    """Where pods run: resources, accelerator and the device the CLI should use."""

    name: str
    gpus: int
    cpu: str
    memory: str
    device: str


PROFILES = {
    "gpu": Profile("gpu", gpus=1, cpu="8", memory="64Gi", device="cuda"),
    "cpu": Profile("cpu", gpus=0, cpu="2", memory="8Gi", device="cpu"),
}


PULL_POLICIES = ("Always", "IfNotPresent", "Never")


@dataclass(frozen=True)
class JobSettings:
    image: str = "ghcr.io/investment-risk/investment-risk:0.1.0"
    namespace: str = APP
    profile: str = "gpu"
    queue: str | None = None  # a Kueue LocalQueue; None leaves admission to the default scheduler
    deadline_s: int = DAY  # activeDeadlineSeconds
    ttl_s: int = 7 * DAY  # ttlSecondsAfterFinished
    data_size: str = "200Gi"
    models_size: str = "100Gi"
    storage_class: str | None = None
    pull_policy: str | None = None  # imagePullPolicy; None: IfNotPresent for a digest (it cannot change), else Always

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ConfigError(f"--profile must be one of {', '.join(PROFILES)}")
        if not _NAME.match(self.namespace) or len(self.namespace) > 63:
            raise ConfigError(f"--namespace {self.namespace!r} is not a valid Kubernetes name")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"--image {self.image!r} is not an image reference")
        if self.queue is not None and not _NAME.match(self.queue):
            raise ConfigError(f"--queue {self.queue!r} is not a valid Kueue queue name")
        for flag, size in (("--data-size", self.data_size), ("--models-size", self.models_size)):
            if not _QUANTITY.match(size) or size.endswith("m") or not quantity(size, flag) > 0:
                raise ConfigError(f"{flag} {size!r} is not a storage quantity above zero (like 200Gi or 1Ti)")
        if self.storage_class is not None and not _SUBDOMAIN.match(self.storage_class):
            raise ConfigError(f"--storage-class {self.storage_class!r} is not a valid StorageClass name")
        if self.pull_policy is not None and self.pull_policy not in PULL_POLICIES:
            raise ConfigError(f"--image-pull-policy must be one of {', '.join(PULL_POLICIES)}")

    @property
    def image_pull_policy(self) -> str:
        # A tag can be pushed again (Always fetches what it names now); a digest cannot, so the node's copy is it.
        return self.pull_policy or ("IfNotPresent" if "@sha256:" in self.image else "Always")

    @property
    def hardware(self) -> Profile:
        return PROFILES[self.profile]


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    model: str
    inputs: tuple[str, ...]
    out: str
    shards: int = 4
    parallelism: int | None = None  # default: all shards at once
    backend: str = "onnx"
    max_failed_shards: int = 0
    retries_per_shard: int = 2
    extra_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TrainSpec:
    name: str
    mode: str
    data: str
    out: str
    base_model: str = "qwen2.5-1.5b"
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def named_options(args: tuple[str, ...]) -> set[str]:
    """The options a list of --extra-arg values sets, written either way: `--flag value` or `--flag=value`."""
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def check_paths(**paths: tuple[str, ...] | str | None) -> None:
    """Refuse an empty path (`--out ""`): in the pod it reads as its working directory, or waits for hours on it."""
    empty = [f"--{flag.replace('_', '-')}" for flag, values in paths.items()
             for value in ((values,) if isinstance(values, str) else values or ()) if not value.strip()]
    if empty:
        raise ConfigError(f"{', '.join(dict.fromkeys(empty))}: an empty path")


def check_name(name: str, what: str = "--name") -> str:
    # Indexed Job pods are named <job>-<index>-<random>: keep room under the 63-character label limit.
    if not _NAME.match(name) or len(name) > 52:
        raise ConfigError(f"{what} {name!r} must be a DNS label of at most 52 characters (a-z, 0-9, '-')")
    return name


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


# checkov reads skips from annotations; each says why the check does not apply.
IMAGE_DIGEST_SKIP = {"checkov.io/skip1": "CKV_K8S_43=The image is built per release; pin it by digest at deploy time "
                                         "with `kustomize edit set image` or `jobs submit --image REPO@sha256:...`"}

PULL_POLICY_SKIP = {"checkov.io/skip2": "CKV_K8S_15=A digest cannot change (the node's copy is the image), or the "
                                       "image was loaded into the nodes (kind) and no registry has it"}


def _meta(name: str, settings: JobSettings, component: str, queue: bool = False) -> dict[str, Any]:
    labels = _labels(component)
    if queue and settings.queue:
        labels[KUEUE_LABEL] = settings.queue
    annotations = {} if "@sha256:" in settings.image else dict(IMAGE_DIGEST_SKIP)
    if settings.image_pull_policy != "Always":
        annotations.update(PULL_POLICY_SKIP)
    return {"name": name, "namespace": settings.namespace, "labels": labels,
            **({"annotations": annotations} if annotations else {})}


# The pod's scratch space (the root filesystem is read-only). The emptyDirs count towards the pod's
# ephemeral-storage, which also holds its logs: the limit leaves room for both, so an emptyDir can reach its own.
CACHE_GI, TMP_GI, LOGS_GI = 20, 4, 2


def _resources(settings: JobSettings, gpu: bool) -> dict[str, Any]:
    hw = settings.hardware
    limits = {"cpu": hw.cpu, "memory": hw.memory, "ephemeral-storage": f"{CACHE_GI + TMP_GI + LOGS_GI}Gi"}
    if gpu and hw.gpus:
        limits["nvidia.com/gpu"] = str(hw.gpus)
    return {"requests": dict(limits), "limits": limits}


def _container(name: str, args: list[str], settings: JobSettings, gpu: bool) -> dict[str, Any]:
    return {
        "name": name,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "envFrom": [{"configMapRef": {"name": SETTINGS_CONFIGMAP}}],
        "env": [
            {"name": "INVESTMENT_RISK_DEVICE", "value": settings.hardware.device},
            # The Job's name, so a CronJob's runs write to their own folders: args expand $(JOB_NAME).
            {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
            # One run_id on every log line of the Job: all its shards, and a retried pod.
            {"name": "INVESTMENT_RISK_RUN_ID", "value": "$(JOB_NAME)"},
        ],
        "resources": _resources(settings, gpu),
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT},
            {"name": "models", "mountPath": MODELS_MOUNT},
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "hf-token", "mountPath": HF_TOKEN_DIR, "readOnly": True},
        ],
    }


def _pod_spec(container: dict[str, Any], settings: JobSettings, gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": RUNNER_SA,
        "automountServiceAccountToken": False,
        # OnRootMismatch: the kubelet re-owns a volume only when its root is not ours already, not at every start
        # (a recursive chown of a 200 Gi volume at each pod and retry).
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}},
            {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC}},
            # The root filesystem is read-only: the model caches and /tmp are size-limited scratch space.
            {"name": "cache", "emptyDir": {"sizeLimit": f"{CACHE_GI}Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GI}Gi"}},
            {"name": "hf-token", "secret": {"secretName": HF_TOKEN_SECRET, "optional": True, "defaultMode": 0o440}},
        ],
    }
    if gpu and settings.hardware.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def _failure_policy(container: str) -> dict[str, Any]:
    return {"rules": [
        # A pod evicted or preempted (node drain, spot reclaim) did nothing wrong: retry without counting it, first
        # (rules apply in order), whatever its stopped process exited with.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # Exit 2 is bad input or usage: retrying cannot help, so the whole Job fails at once.
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [2]}},
    ]}


TRAIN_GRACE_S = 180
SCORE_GRACE_S = 90


def train_job(spec: TrainSpec, settings: JobSettings) -> dict[str, Any]:
    check_name(spec.name)
    if spec.mode not in ("distillation", "instruction"):
        raise ConfigError("--mode must be distillation or instruction")
    args = ["train", "--mode", spec.mode, "--base-model", spec.base_model, "--data", spec.data, "--out", spec.out,
            "--resume-if-present", *spec.extra_args]
    container = _container("train", args, settings, gpu=True)
    # torch.compile's kernels (`--extra-arg --compile`) kept on the models PVC: a retried or resumed pod, and the next
    # training run, load them instead of compiling again. The training pod's alone: torch makes the folder when
    # transformers is imported, so in the ConfigMap every PyTorch pod failed where /models is mounted read-only.
    container["env"] += [{"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{MODELS_MOUNT}/compile-cache/torchinductor"},
                         {"name": "TRITON_CACHE_DIR", "value": f"{MODELS_MOUNT}/compile-cache/triton"}]
    pod = _pod_spec(container, settings, gpu=True)
    # SIGTERM lets the step under way (or an epoch's validation) finish and a checkpoint land before the SIGKILL.
    pod["terminationGracePeriodSeconds"] = TRAIN_GRACE_S
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(spec.name, settings, "train", queue=True),
        "spec": {
            "backoffLimit": 3, "activeDeadlineSeconds": settings.deadline_s, "ttlSecondsAfterFinished": settings.ttl_s,
            "podFailurePolicy": _failure_policy("train"),
            "template": {"metadata": {"labels": _labels("train")}, "spec": pod},
        },
    }


def stage_job(name: str, base_model: str, settings: JobSettings, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fetch the base model into the models PVC's Hugging Face cache (the pods' HF_HOME), once, before training:
    the one pod that reaches the hub, so the ConfigMap's HF_HUB_OFFLINE is lifted for it alone."""
    check_name(name)
    small = replace(settings, profile="cpu")  # a download: no accelerator
    container = _container("stage", ["stage-model", "--base-model", base_model, *extra_args], small, gpu=False)
    container["env"].append({"name": "HF_HUB_OFFLINE", "value": "0"})
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, settings, "stage", queue=True),
        "spec": {"backoffLimit": 3, "activeDeadlineSeconds": settings.deadline_s, "ttlSecondsAfterFinished": settings.ttl_s,
                 "podFailurePolicy": _failure_policy("stage"),
                 "template": {"metadata": {"labels": _labels("stage")}, "spec": _pod_spec(container, small, gpu=False)}},
    }


EXPORT_CPU_MEMORY_GI = 16


def export_job(name: str, run: str, out: str, settings: JobSettings, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge, export and prove a training run into the model directory scoring reads: on a GPU the fp16 graph the
    CUDA scorer runs, its parity measured there; on CPUs the fp32 graph and the measured CPU engine. An
    `--extra-arg` may name another --dtype or --device: it replaces the profile's (an option is given once)."""
    check_name(name)
    if not run or not out:
        raise ConfigError("export needs --run (the training run directory, e.g. /models/runs/NAME)")
    gpu = settings.hardware.gpus > 0
    named = named_options(extra_args)
    defaults = [arg for flag, value in (("--dtype", "fp16"), ("--device", "cuda")) if gpu and flag not in named
                for arg in (flag, value)]
    args = ["export", "--run", run, "--out", out, *defaults, *extra_args]
    container = _container("export", args, settings, gpu=True)
    if not gpu and quantity(settings.hardware.memory, "memory") < EXPORT_CPU_MEMORY_GI * 2**30:
        # A CPU export of Qwen2.5-1.5B peaked at 12.3 GiB (README): a scoring pod's memory would kill it.
        for kind in ("requests", "limits"):
            container["resources"][kind]["memory"] = f"{EXPORT_CPU_MEMORY_GI}Gi"
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, settings, "export", queue=True),
        "spec": {"backoffLimit": 2, "activeDeadlineSeconds": settings.deadline_s, "ttlSecondsAfterFinished": settings.ttl_s,
                 "podFailurePolicy": _failure_policy("export"),
                 "template": {"metadata": {"labels": _labels("export")}, "spec": _pod_spec(container, settings, gpu=True)}},
    }


MAX_COMPLETIONS = 100_000  # the API server's limit for an Indexed Job
SHARDING_OPTIONS = {"--shard-count", "--shard-index", "--out"}  # what the merge Job reads too


def _score_job_spec(spec: ScoreSpec, settings: JobSettings) -> dict[str, Any]:
    if spec.shards < 1 or (spec.parallelism is not None and spec.parallelism < 1):
        raise ConfigError("--shards and --parallelism must be at least 1")
    if spec.shards > MAX_COMPLETIONS:
        raise ConfigError(f"--shards {spec.shards}: an Indexed Job has at most {MAX_COMPLETIONS} completions")
    if not spec.inputs:
        raise ConfigError("--input is required")
    check_paths(input=spec.inputs, model=spec.model, out=spec.out)
    # The Job gives each pod its shard: an --extra-arg that sets these would score another batching than it waits for
    if taken := sorted(named_options(spec.extra_args) & SHARDING_OPTIONS):
        raise ConfigError(f"--extra-arg {', '.join(taken)}: the Job sets it itself (use --shards)")
    args = ["score", "--model", spec.model, *[a for path in spec.inputs for a in ("--input", path)], "--out", spec.out,
            "--shard-count", str(spec.shards), "--backend", spec.backend, *spec.extra_args]
    container = _container("score", args, settings, gpu=True)
    pod = _pod_spec(container, settings, gpu=True)
    # SIGTERM lets the model call under way (a large one on CPUs takes many seconds) finish and a checkpoint land.
    pod["terminationGracePeriodSeconds"] = SCORE_GRACE_S
    return {
        "completionMode": "Indexed", "completions": spec.shards, "parallelism": spec.parallelism or spec.shards,
        # Each shard retries on its own; one bad shard does not stop the others unless more than allowed fail.
        "backoffLimitPerIndex": spec.retries_per_shard, "maxFailedIndexes": spec.max_failed_shards,
        "activeDeadlineSeconds": settings.deadline_s, "ttlSecondsAfterFinished": settings.ttl_s,
        "podFailurePolicy": _failure_policy("score"),
        "template": {"metadata": {"labels": _labels("score")}, "spec": pod},
    }


def score_job(spec: ScoreSpec, settings: JobSettings) -> dict[str, Any]:
    """An Indexed Job: pod i scores shard i (JOB_COMPLETION_INDEX) and merges whatever shards are done."""
    check_name(spec.name)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(spec.name, settings, "score", queue=True),
            "spec": _score_job_spec(spec, settings)}


MERGE_REQUESTS = {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "2Gi"}
MERGE_LIMITS = {"cpu": "1", "memory": "2Gi"}


def merge_job(name: str, out: str, shards: int, settings: JobSettings,
              extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The last step: merge the shards' metrics; exits 1 (and is retried) until all shards are done."""
    check_name(name)
    small = replace(settings, profile="cpu")  # merging reads JSON: no accelerator
    # The pod waits for the shards itself (the Job's backoff would give up after minutes, scoring takes hours).
    wait = str(max(settings.deadline_s - 600, 60))
    container = _container("merge", ["score-merge", "--out", out, "--expect-shards", str(shards), "--wait-seconds", wait,
                                     *extra_args], small, gpu=False)
    # It polls small JSON files for hours: reserve a fraction of a scoring pod, allow a burst for the merge itself.
    container["resources"]["requests"].update(MERGE_REQUESTS)
    container["resources"]["limits"].update(MERGE_LIMITS)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, settings, "merge", queue=True),
        "spec": {"backoffLimit": 6, "activeDeadlineSeconds": settings.deadline_s, "ttlSecondsAfterFinished": settings.ttl_s,
                 "podFailurePolicy": _failure_policy("merge"),
                 "template": {"metadata": {"labels": _labels("merge")}, "spec": _pod_spec(container, settings, gpu=False)}},
    }


NIGHTLY_LEDGER = f"{DATA_MOUNT}/scored/ledger.json"
NIGHTLY_METRICS_GROUP = "nightly"


# A CronJob's schedule: the five fields of cron (minute hour day-of-month month day-of-week), or a macro.
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
               ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
               ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")))  # 7 is refused, as robfig/cron does
_CRON_ITEM = re.compile(r"^(\*|\?|(\w+)(-(\w+))?)(/(\d+))?$")


def check_schedule(schedule: str) -> None:
    """Refuse what the API server would: a schedule that is not five cron fields (or a macro)."""
    if schedule.strip() in CRON_MACROS:
        return
    fields = schedule.split()
    if len(fields) != 5:
        raise ConfigError(f"--schedule {schedule!r}: expected five cron fields (minute hour day-of-month month "
                          f"day-of-week) or one of {', '.join(CRON_MACROS)}")
    for text, (name, low, high, names) in zip(fields, CRON_FIELDS):
        for item in text.split(","):
            match = _CRON_ITEM.match(item)
            values = [] if match is None else [v for v in (match.group(2), match.group(4)) if v]
            numbers = [names.index(v.upper()) + low if v.upper() in names else int(v) if v.isdigit() else None
                       for v in values]
            step = match.group(6) if match else None
            backwards = len(numbers) == 2 and None not in numbers and numbers[0] > numbers[1]
            if (match is None or None in numbers or not all(low <= n <= high for n in numbers) or step == "0"
                    or backwards):
                raise ConfigError(f"--schedule {schedule!r}: {item!r} is not valid in the {name} field ({low}-{high}"
                                  f"{', a range runs upwards' if backwards else ''})")


def check_time_zone(time_zone: str) -> None:
    import zoneinfo

    if not zoneinfo.available_timezones():  # no time-zone database on this machine to check against
        return
    try:
        zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--time-zone {time_zone!r}: not an IANA time zone (like Etc/UTC or Europe/Berlin)") from None


def nightly_cronjob(spec: ScoreSpec, settings: JobSettings, schedule: str = "30 2 * * *",
                    time_zone: str = "Etc/UTC") -> dict[str, Any]:
    """The nightly batch: an Indexed scoring Job whose every run writes under its own Job name and scores only the
    input units that no earlier night scored (the ledger under the scored root)."""
    check_name(spec.name)
    check_schedule(schedule)
    check_time_zone(time_zone)
    if "$(JOB_NAME)" not in spec.out:  # one fixed folder: from the second night on, every shard is "already done"
        raise ConfigError(f"--out {spec.out}: a nightly run needs a folder of its own; include $(JOB_NAME) "
                          f"(the default is {DATA_MOUNT}/scored/$(JOB_NAME))")
    named = named_options(spec.extra_args)
    if "--ledger" not in named:
        spec = replace(spec, extra_args=(*spec.extra_args, "--ledger", NIGHTLY_LEDGER))
    if "--metrics-group" not in named:  # the group the dashboard and the alerts read
        spec = replace(spec, extra_args=(*spec.extra_args, "--metrics-group", NIGHTLY_METRICS_GROUP))
    job_spec = _score_job_spec(spec, settings)
    job_meta = {"labels": _meta(spec.name, settings, "nightly", queue=True)["labels"]}
    return {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(spec.name, settings, "nightly"),
        "spec": {"schedule": schedule, "timeZone": time_zone, "concurrencyPolicy": "Forbid",
                 "startingDeadlineSeconds": 3600, "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 5,
                 "jobTemplate": {"metadata": job_meta, "spec": job_spec}},
    }


def shared_resources(settings: JobSettings) -> list[dict[str, Any]]:
    """Namespace, storage, settings and RBAC that every Job relies on."""
    ns = settings.namespace

    def pvc(name: str, size: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}
        if settings.storage_class:
            spec["storageClassName"] = settings.storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": ns, "labels": _labels("storage")}, "spec": spec}

    def account(name: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                "metadata": {"name": name, "namespace": ns, "labels": _labels("rbac")}}

    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
            **_labels("namespace"), **{f"pod-security.kubernetes.io/{mode}": "restricted"
                                       for mode in ("enforce", "audit", "warn")}}}},
        pvc(DATA_PVC, settings.data_size),
        pvc(MODELS_PVC, settings.models_size),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": SETTINGS_CONFIGMAP, "namespace": ns,
                                                               "labels": _labels("settings")},
         "data": {
             "INVESTMENT_RISK_LOG_FORMAT": "json", "INVESTMENT_RISK_LOG_LEVEL": "info",
             # The Hugging Face cache lives on the models PVC: stage the base model there once (see the README).
             "HF_HOME": f"{MODELS_MOUNT}/huggingface", "INVESTMENT_RISK_CACHE": f"{CACHE_MOUNT}/investment-risk",
             "HF_HUB_OFFLINE": "1", "HF_TOKEN_PATH": f"{HF_TOKEN_DIR}/token", "TOKENIZERS_PARALLELISM": "false",
             "MPLCONFIGDIR": "/tmp/matplotlib",
             # The Prometheus Pushgateway the scoring Jobs push to, e.g. http://pushgateway.monitoring:9091 (empty: none).
             "INVESTMENT_RISK_PUSHGATEWAY": "",
         }},
        account(RUNNER_SA),
        account(SUBMITTER_SA),
        # The pods read and write mounted volumes only: no ingress at all, egress only to DNS, HTTPS (the Hugging
        # Face hub, when a run is allowed online with the token) and the Pushgateway's port (9091).
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": APP, "namespace": ns, "labels": _labels("network")},
         "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": APP}}, "policyTypes": ["Ingress", "Egress"],
                  "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53},
                                        {"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 9091}]}]}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": SUBMITTER_SA, "namespace": ns, "labels": _labels("rbac")},
         "rules": [
             {"apiGroups": ["batch"], "resources": ["jobs"],
              "verbs": ["create", "get", "list", "watch", "delete"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": SUBMITTER_SA, "namespace": ns, "labels": _labels("rbac")},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SUBMITTER_SA},
         "subjects": [{"kind": "ServiceAccount", "name": SUBMITTER_SA, "namespace": ns}]},
    ]


def _suspended(job: dict[str, Any]) -> dict[str, Any]:
    job["spec"]["suspend"] = True
    return job


def default_base(settings: JobSettings | None = None) -> dict[str, list[dict[str, Any]]]:
    """What k8s/base holds: file name -> documents, for the default settings.

    What lives on in the cluster, and `kubectl apply -k` keeps in step: storage, settings, RBAC, the NetworkPolicy
    and the nightly CronJob, created suspended (a night before /models/current holds a model would fail). No Job:
    a Job runs once and its pod template cannot change after creation, so a Job in the base would make the next
    apply with a new image fail, and Kueue admits a suspended Job that carries its queue label (it would start on
    apply). Jobs are launched with `jobs submit` (or rendered with `jobs render KIND` for `kubectl create`)."""
    settings = settings or JobSettings()
    nightly = ScoreSpec(name=f"{APP}-nightly", model=f"{MODELS_MOUNT}/current", inputs=(f"{DATA_MOUNT}/incoming",),
                        out=f"{DATA_MOUNT}/scored/$(JOB_NAME)", shards=4)
    return {
        "shared.yaml": shared_resources(settings),
        "nightly-cronjob.yaml": [_suspended(nightly_cronjob(nightly, settings))],
    }


KINDS = ("stage", "train", "export", "score", "merge", "nightly")


def default_name(kind: str) -> str:
    """investment-risk-KIND-<UTC time>-<4 random hex>: two submits in the same second get two Jobs, not a
    conflict that points one submitter at the other's Job."""
    import datetime as dt
    import secrets

    return f"{APP}-{kind}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def build(kind: str, settings: JobSettings, *, name: str | None = None, mode: str = "distillation",
          data: str = f"{DATA_MOUNT}/splits/latest", base_model: str = "qwen2.5-1.5b", model: str = f"{MODELS_MOUNT}/current",
          inputs: tuple[str, ...] = (f"{DATA_MOUNT}/incoming",), out: str | None = None, shards: int = 4,
          parallelism: int | None = None, backend: str = "onnx", schedule: str = "30 2 * * *",
          time_zone: str = "Etc/UTC", extra_args: tuple[str, ...] = (), run: str | None = None) -> dict[str, Any]:
    """One manifest of `kind` from command-line parameters (paths are as the pod sees them)."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}")
    if name is None:  # an empty --name is refused by check_name, not replaced
        name = f"{APP}-nightly" if kind == "nightly" else default_name(kind)
    check_paths(data=data, model=model, input=inputs, out=out, run=run)  # given empty, not replaced by a default
    if kind == "stage":
        return stage_job(name, base_model, settings, extra_args)
    if kind == "train":
        return train_job(TrainSpec(name, mode, data, out or f"{MODELS_MOUNT}/runs/{name}", base_model, extra_args), settings)
    if kind == "export":
        return export_job(name, run or "", out or f"{MODELS_MOUNT}/exports/{name}", settings, extra_args)
    score_out = out or (f"{DATA_MOUNT}/scored/$(JOB_NAME)" if kind == "nightly" else f"{DATA_MOUNT}/scored/{name}")
    spec = ScoreSpec(name, model, inputs, score_out, shards, parallelism, backend, extra_args=extra_args)
    if kind == "score":
        return score_job(spec, settings)
    if kind == "merge":
        if out is None:
            raise ConfigError("merge needs --out: the scoring output directory to merge")
        return merge_job(name, out, shards, settings, extra_args)
    return nightly_cronjob(spec, settings, schedule, time_zone)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
