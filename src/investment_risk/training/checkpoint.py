"""Training checkpoints as safetensors + JSON (never pickle): adapter and head, optimizer, scheduler, RNG, position.

A checkpoint directory is written whole (the atomic directory writer), and only then named in `latest.json`, so
a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.atomic import read_json, write_dir_atomic, write_json_atomic
from ..core.errors import InputError, unreadable

KEEP = 2


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any], extra_tensors: dict[str, torch.Tensor], run_config: Path) -> Path:
    """A checkpoint of `step`, with a copy of the run's resolved hyperparameters (`run_config`) beside it."""
    def fill(work: Path) -> None:
        shutil.copyfile(run_config, work / run_config.name)
        save_file(trainable_state(model), str(work / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        rng = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file({**opt_tensors, **rng, **{f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()}},
                  str(work / "state.safetensors"))
        (work / "state.json").write_text(json.dumps({
            "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "state": state,
        }, default=float))

    final = write_dir_atomic(root / f"step-{step:08d}", fill)
    write_json_atomic({"checkpoint": final.name, "step": step}, root / "latest.json")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resumable_checkpoints(root: Path) -> list[Path]:
    """The checkpoints a resume may start from, in the order to try them: the one latest.json names, then the
    others newest first (one found damaged falls back to the one before it)."""
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    named = None
    if (root / "latest.json").exists():
        try:
            named = root / read_json(root / "latest.json")["checkpoint"]
        except (InputError, KeyError, TypeError):
            pass  # a damaged pointer: the folders are still there to try
    return ([named] if named in found else []) + [p for p in found if p != named]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore everything in place; returns the saved training state and the extra tensors."""
    missing = [name for name in ("trainable.safetensors", "state.safetensors", "state.json") if not (path / name).exists()]
    if missing:
        raise InputError(f"checkpoint {path} is incomplete: missing {', '.join(missing)} (pickle files are never loaded)")
    try:
        trainable, tensors = load_file(str(path / "trainable.safetensors")), load_file(str(path / "state.safetensors"))
    except (OSError, SafetensorError) as exc:  # cut short by a full disk or a power cut (a storage hiccup: retried)
        raise unreadable(f"checkpoint {path}", exc, "damaged") from None
    meta = read_json(path / "state.json")
    params = dict(model.named_parameters())
    for name, value in trainable.items():
        if name not in params:
            raise InputError(f"{path}: checkpoint holds {name}, which this model does not have")
        params[name].data.copy_(value.to(params[name].device))
    try:  # a state.json that parses but lacks what it must hold is as damaged as a cut-short one
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in meta["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        saved_state = meta["state"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"checkpoint {path}: damaged ({type(exc).__name__}: {exc})") from None
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    extra = {k[len("extra."):]: v.to(device) for k, v in tensors.items() if k.startswith("extra.")}
    return saved_state, extra
