"""`jobs run-local --runtime docker`: each pod of a Job as a container of its image, with what the kubelet would give it.

From the pod spec: the user, group and fsGroup, a read-only root, dropped capabilities and no privilege escalation
(securityContext, container over pod); the environment (passed by name, so values stay out of the process list);
volumes at their mount paths (a PVC as the given host directory, group-owned by fsGroup as the kubelet makes it; an
emptyDir as a tmpfs of its size limit; a Secret as read-only files); cpu and memory limits. Containers get no
network: the Jobs read and write only their volumes.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.logs import get_logger
from .manifests import quantity

def _docker() -> str:
    found = shutil.which("docker")
    if found is None:
        raise ConfigError("--runtime docker: no docker client on PATH (`make image` installs and starts the engine)")
    return found


def _security(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    args: list[str] = []
    if "runAsUser" in merged:
        args += ["--user", f"{merged['runAsUser']}:{merged.get('runAsGroup', merged['runAsUser'])}"]
    elif merged.get("runAsNonRoot"):
        raise ConfigError("runAsNonRoot without runAsUser: give the pod a numeric user to run it locally")
    if "fsGroup" in pod.get("securityContext", {}):
        args += ["--group-add", str(pod["securityContext"]["fsGroup"])]
    if merged.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    capabilities = merged.get("capabilities", {})
    args += [a for cap in capabilities.get("drop", []) for a in ("--cap-drop", cap)]
    args += [a for cap in capabilities.get("add", []) for a in ("--cap-add", cap)]
    if merged.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def _resources(container: dict[str, Any]) -> list[str]:
    limits = container.get("resources", {}).get("limits", {})
    args = []
    if "cpu" in limits:
        args += ["--cpus", f"{quantity(limits['cpu'], 'resources.limits.cpu'):g}"]
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"], "resources.limits.memory")))]
    return args


def _own_for_fs_group(directory: Path, group: int) -> None:
    """What the kubelet does to a volume for fsGroup: group-owned, group-writable, new files inherit the group."""
    try:
        for root, dirs, files in os.walk(directory):
            for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(name, -1, group, follow_symlinks=False)
                mode = os.lstat(name).st_mode
                os.chmod(name, mode | 0o060 | (0o2000 if os.path.isdir(name) else 0))
    except PermissionError as exc:
        raise ConfigError(f"{directory}: cannot give it to fsGroup {group} as the kubelet would ({exc.strerror}); "
                          "run as root or chgrp it yourself") from None


class DockerRuntime:
    """Starts and stops the pods of one Job as containers."""

    def __init__(self, job: dict[str, Any], docs: list[dict[str, Any]], mounts: dict[str, Path], scratch: Path,
                 image: str | None = None) -> None:
        self.docker = _docker()
        self.pod = job["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]
        self.image = image or self.container["image"]
        self.names: dict[int, str] = {}
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        self.base = ["run", "--rm", "--init", "--pull", "never", "--network", "none",
                     *_security(self.pod, self.container), *_resources(self.container),
                     *self._volumes(mounts, secrets, scratch)]
        if self.container.get("workingDir"):
            self.base += ["--workdir", self.container["workingDir"]]

    def _volumes(self, given: dict[str, Path], secrets: dict[str, dict[str, Any]], scratch: Path) -> list[str]:
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        fs_group = self.pod.get("securityContext", {}).get("fsGroup")
        fs_group = None if fs_group is None else int(fs_group)
        args: list[str] = []
        for mount in self.container.get("volumeMounts", []):
            path, volume = mount["mountPath"], volumes.get(mount["name"], {})
            ro = ",readonly" if mount.get("readOnly") else ""
            if "persistentVolumeClaim" in volume:
                if path not in given:
                    raise ConfigError(f"mount {path} (PVC {volume['persistentVolumeClaim']['claimName']}) has no "
                                      f"local directory: pass --mount {path}=DIR")
                local = given[path].resolve()
                if not local.is_dir():
                    raise ConfigError(f"--mount {path}={given[path]}: not a directory")
                if fs_group is not None:
                    _own_for_fs_group(local, fs_group)
                args += ["--mount", f"type=bind,source={local},target={path}{ro}"]
            elif "emptyDir" in volume:
                size = volume["emptyDir"].get("sizeLimit")
                options = "mode=1777" + (f",size={int(quantity(size, 'emptyDir.sizeLimit'))}" if size else "")
                args += ["--tmpfs", f"{path}:{options}"]
            elif "secret" in volume:
                local = self._secret_dir(volume["secret"], secrets, scratch, mount["name"], fs_group)
                args += ["--mount", f"type=bind,source={local},target={path},readonly"]
            else:
                raise ConfigError(f"volume {mount['name']}: only PVCs, emptyDirs and Secrets run locally")
        return args

    @staticmethod
    def _secret_dir(ref: dict[str, Any], secrets: dict[str, dict[str, Any]], scratch: Path, name: str,
                    fs_group: int | None) -> Path:
        """The Secret's keys as files (from the manifest file); an optional Secret that is absent gives none. As the
        kubelet writes them: defaultMode, group-owned by fsGroup."""
        secret = secrets.get(ref["secretName"])
        if secret is None and not ref.get("optional"):
            raise ConfigError(f"Secret {ref['secretName']!r} is not in the manifest file and is not optional")
        directory = scratch / "secrets" / name
        directory.mkdir(parents=True, exist_ok=True)
        items = {k: base64.b64decode(v) for k, v in (secret or {}).get("data", {}).items()}
        items.update({k: v.encode() for k, v in (secret or {}).get("stringData", {}).items()})
        for key, value in items.items():
            (directory / key).write_bytes(value)
            try:
                if fs_group is None:
                    raise PermissionError
                os.chown(directory / key, -1, fs_group)
                os.chmod(directory / key, int(ref.get("defaultMode", 0o644)))
            except PermissionError:  # not root: readable by the container's user some other way
                os.chmod(directory / key, 0o444)
        os.chmod(directory, 0o755)
        return directory

    def start(self, index: int, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        name = f"{self.pod.get('hostname', 'pod')}-{index}-{uuid.uuid4().hex[:8]}"
        self.names[index] = name
        # `args` is command + args as the pod runs them; a command replaces the image's entrypoint.
        entry = ["--entrypoint", args[0]] if self.container.get("command") else []
        rest = args[1:] if entry else args
        docker_args = [self.docker, *self.base, "--name", name, *entry,
                       *[a for key in sorted(env) for a in ("--env", key)], self.image, *rest]
        get_logger().debug("local_container", name=name, image=self.image)
        return subprocess.Popen(docker_args, env={**os.environ, **env})

    def stop(self, index: int, process: subprocess.Popen) -> None:
        # As the kubelet stops a pod: SIGTERM (the CLI's handler cleans up and logs `terminated`), SIGKILL after the
        # pod's grace period.
        grace = str(self.pod.get("terminationGracePeriodSeconds", 30))
        subprocess.run([self.docker, "stop", "--time", grace, self.names[index]], capture_output=True, check=False)
        process.terminate()  # the client too, in case the container never started
        process.wait()
