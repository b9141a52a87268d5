"""Distillation training: a readable recipe with an explicit loop.

    config -> data (validated, tokenised once) -> model (base + LoRA + regression head) -> epochs of
    length-grouped batches -> best-by-val-MAE model, history, metadata and reports in the run directory.

Checkpoints at every epoch end and every `checkpoint_steps` optimizer steps hold everything `--resume` needs to
finish with the same history as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .batching import article_text, encode, encode_cached, length_grouped_batches, pad_batch, predict, to_device
from .dataio import read_articles, write_dir_atomic, write_json_atomic
from .errors import ConfigError, InputError
from .logs import Progress, get_logger
from .metrics import regression_metrics
from .spec import DIMENSIONS, default_spec

MODES = ("distillation", "instruction")


@dataclass(frozen=True)
class TrainConfig:
    """The resolved hyperparameters; saved beside every checkpoint and in the run's metadata."""

    mode: str
    base_model: str
    data: str
    out: str
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-5
    head_lr_multiplier: float = 10.0
    score_loss_weight: float = 1.0  # instruction mode: lambda in token loss + lambda * score MSE
    max_length: int = 0  # 0: the mode's default, 512 for distillation, 1024 for instruction
    warmup_steps: int = 500
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_steps: int = 500
    log_every: int = 20
    device: str = "auto"
    compile: bool = False
    train_embeddings: bool = False  # instruction mode: also train the (tied) token embeddings

    def __post_init__(self) -> None:
        if not self.max_length:
            object.__setattr__(self, "max_length", 1024 if self.mode == "instruction" else 512)
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "--learning-rate must be positive"),
            (8 <= self.max_length <= 32768, "--max-length must be in [8, 32768]"),
            (self.head_lr_multiplier > 0, "--head-lr-multiplier must be positive"),
            (self.score_loss_weight >= 0, "--score-loss-weight must be >= 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.checkpoint_steps >= 1, "--checkpoint-steps must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.mode == "instruction" or not self.train_embeddings, "--train-embeddings needs --mode instruction"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SplitData:
    table: Any
    labels: np.ndarray  # (n, 8) float32
    tokens: list[np.ndarray]
    prompt_lengths: np.ndarray | None = None  # instruction mode: where each prompt ends and the target begins
    prompt_max_length: int | None = None  # instruction mode: the prompt budget that scoring must use

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens])


def read_split(data_dir: Path, name: str) -> Any:
    path = data_dir / f"{name}.parquet"
    if not path.exists():
        raise InputError(f"{path}: no such file (--data must be a directory made by 'data split')")
    return read_articles([path], labels=DIMENSIONS)


def label_matrix(table: Any) -> np.ndarray:
    return np.stack([table.column(d).to_numpy(zero_copy_only=False) for d in DIMENSIONS], axis=1).astype(np.float32)


def texts_of(table: Any) -> list[str]:
    return [article_text(t, c) for t, c in zip(table.column("title").to_pylist(), table.column("content").to_pylist())]


def pick_device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def warmup_for(config: TrainConfig, total_steps: int) -> int:
    """The configured warm-up, capped at 10 % of all optimizer steps (small data would otherwise never leave it)."""
    cap = max(1, int(0.1 * total_steps))
    return min(config.warmup_steps, cap)


def _check_out_dir(config: TrainConfig, resume: bool) -> Path:
    out = Path(config.out)
    if resume:
        saved = out / "training_config.json"
        if not saved.exists():
            raise InputError(f"--resume: {out} holds no training run (no training_config.json)")
        previous = json.loads(saved.read_text())
        for key in ("mode", "base_model"):
            if previous.get(key) != getattr(config, key):
                raise InputError(f"--resume: {out} was trained with --{key.replace('_', '-')} {previous.get(key)}, "
                                 f"not {getattr(config, key)}")
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} already exists and is not empty; pass --resume to continue it or choose another")
    return out


def load_training_data(config: TrainConfig, tokenizer: Any, cache: Path | None) -> tuple[SplitData, SplitData]:
    data_dir = Path(config.data)
    splits = []
    for name in ("train", "val"):
        table = read_split(data_dir, name)
        texts = texts_of(table)
        if cache is not None:
            tokens = encode_cached(tokenizer, texts, config.max_length, cache / f"tokens-{name}.safetensors")
        else:
            tokens = encode(tokenizer, texts, config.max_length)
        splits.append(SplitData(table, label_matrix(table), tokens))
    train, val = splits
    if train.table.num_rows < config.batch_size:
        raise InputError(f"{data_dir / 'train.parquet'}: {train.table.num_rows} rows are too few for one batch of "
                         f"--batch-size {config.batch_size}")
    return train, val


class DistillationTask:
    """Article -> base model -> 8-output regression head; MSE. The production mode."""

    mode = "distillation"

    def __init__(self, config: TrainConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def prepare(self, cache: Path | None) -> tuple[SplitData, SplitData]:
        return load_training_data(self.config, self.tokenizer, cache)

    def build_model(self, base: Any, dtype: Any, label_mean: np.ndarray) -> Any:
        from .models import regression_model

        model = regression_model(base, self.tokenizer, dtype=dtype)
        init_head_bias(model, label_mean)
        return model

    @staticmethod
    def is_head(name: str) -> bool:
        return "modules_to_save" in name

    def loss_and_preds(self, forward: Any, data: SplitData, idx: np.ndarray, labels: Any, device: Any,
                       autocast_dtype: Any) -> tuple[Any, Any, Any]:
        """(loss to minimise, the head's predictions, a token loss or None) for one micro-batch."""
        import torch

        ids, mask = pad_batch([data.tokens[i] for i in idx], self.pad_id)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            preds = forward(input_ids=to_device(ids, device), attention_mask=to_device(mask, device)).logits.float()
        return torch.nn.functional.mse_loss(preds, labels), preds, None

    def validate(self, model: Any, data: SplitData, device: Any, autocast_dtype: Any) -> tuple[np.ndarray, dict[str, float]]:
        return predict(model, data.tokens, self.pad_id, self.config.batch_size * 2, device, autocast_dtype), {}

    def save(self, model: Any, dest: Path) -> None:
        save_model(model, self.tokenizer, dest)


def make_task(config: TrainConfig, tokenizer: Any) -> Any:
    if config.mode == "instruction":
        from .instruct_train import InstructionTask

        return InstructionTask(config, tokenizer)
    return DistillationTask(config, tokenizer)


def _kill_point() -> int | None:
    """Test hook: SIGKILL this process after the given optimizer step, to prove --resume."""
    value = os.environ.get("_INVESTMENT_RISK_KILL_AT_STEP")
    return int(value) if value else None


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train, checkpoint and write the run package. Returns the training metadata."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from .models import load_tokenizer, parameter_counts, resolve_base_model

    log = get_logger()
    out = _check_out_dir(config, resume)
    started = time.monotonic()
    device = pick_device(config.device)
    base = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(base.path)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.to_json(), out / "training_config.json")
    task = make_task(config, tokenizer)
    train_data, val_data = task.prepare(out / "cache")

    torch.manual_seed(config.seed)
    on_cuda = device.type == "cuda"
    # bf16 on CUDA: the frozen base in bf16 under autocast, adapter and head in fp32. fp32 on CPU.
    autocast_dtype = torch.bfloat16 if on_cuda else None
    model = task.build_model(base, torch.bfloat16 if on_cuda else torch.float32, train_data.labels.mean(axis=0)).to(device)
    total_params, trainable_params = parameter_counts(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The head is trained in full and starts from scratch: it gets a larger step than the adapter.
    head = [p for n, p in model.named_parameters() if p.requires_grad and task.is_head(n)]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not task.is_head(n)]
    optimizer = torch.optim.AdamW(
        [{"params": adapter, "lr": config.learning_rate},
         {"params": head, "lr": config.learning_rate * config.head_lr_multiplier}],
        weight_decay=config.weight_decay, fused=on_cuda or None)
    batches_per_epoch = math.ceil(train_data.table.num_rows / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    warmup = warmup_for(config, total_steps)
    if warmup < config.warmup_steps:
        log.info("warmup_capped", requested=config.warmup_steps, used=warmup, total_steps=total_steps,
                 reason="warm-up is capped at 10% of all optimizer steps")
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    log.info("training_start", mode=config.mode, base_model=config.base_model, device=str(device),
             train_examples=train_data.table.num_rows, val_examples=val_data.table.num_rows,
             parameters=total_params, trainable_parameters=trainable_params, steps_per_epoch=steps_per_epoch,
             total_steps=total_steps, warmup_steps=warmup)

    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    n_train = train_data.table.num_rows
    labels_t = torch.from_numpy(train_data.labels).to(device)
    progress: dict[str, Any] = {"epoch": 1, "batch": 0, "step": 0, "history": [], "best_val_mae": None,
                                "best_epoch": None, "step_losses": [], "tokens": 0, "train_seconds": 0.0, "since_log": 0,
                                "epoch_seconds": [], "epoch_tokens": []}
    epoch_preds = torch.zeros((n_train, len(DIMENSIONS)), dtype=torch.float32, device=device)
    running = torch.zeros((), dtype=torch.float32, device=device)  # loss summed since the last log line, on device
    token_loss = torch.zeros(2, dtype=torch.float32, device=device)  # instruction mode: epoch's token loss sum, count
    checkpoints = out / "checkpoints"
    if resume and (latest := latest_checkpoint(checkpoints)) is not None:
        progress, extra = load_checkpoint(latest, model, optimizer, scheduler, device)
        epoch_preds, running, token_loss = extra["epoch_preds"], extra["running"], extra["token_loss"]
        log.info("resumed", checkpoint=latest.name, epoch=progress["epoch"], batch=progress["batch"], step=progress["step"])

    def checkpoint() -> None:
        save_checkpoint(checkpoints, progress["step"], model, optimizer, scheduler, progress,
                        {"epoch_preds": epoch_preds, "running": running, "token_loss": token_loss})

    # torch.compile fuses the many small ops of LoRA layers and norms (1.7x training tokens/s on an H200).
    forward = torch.compile(model) if config.compile else model
    kill_at = _kill_point()
    train_lengths = train_data.lengths
    segment_start = time.monotonic()
    with Progress(total=batches_per_epoch * config.epochs, what="train", unit="batches") as bar:
        bar.done = (progress["epoch"] - 1) * batches_per_epoch + progress["batch"]
        while progress["epoch"] <= config.epochs:
            epoch = progress["epoch"]
            epoch_started, tokens_before = time.monotonic(), progress["tokens"]
            batches = length_grouped_batches(train_lengths, config.batch_size, config.seed, epoch)
            model.train()
            for b in range(progress["batch"], len(batches)):
                idx = batches[b]
                idx_t = to_device(idx, device)
                loss, preds, tokens_loss = task.loss_and_preds(forward, train_data, idx, labels_t[idx_t], device,
                                                               autocast_dtype)
                if tokens_loss is not None:
                    token_loss += torch.stack([tokens_loss.detach(), torch.ones((), device=device)])
                group_start = (b // config.grad_accum) * config.grad_accum
                group_size = min(config.grad_accum, len(batches) - group_start)
                (loss / group_size).backward()
                epoch_preds[idx_t] = preds.detach()
                running += loss.detach()
                progress["since_log"] += 1
                progress["tokens"] += int(train_lengths[idx].sum())
                bar.update(1)
                if b + 1 - group_start < group_size:
                    continue  # accumulate more micro-batches before stepping
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] += 1
                progress["batch"] = b + 1
                if progress["step"] % config.log_every == 0:
                    mean_loss = float(running.item()) / progress["since_log"]
                    running.zero_()
                    progress["since_log"] = 0
                    progress["step_losses"].append([progress["step"], mean_loss])
                    log.info("train_step", epoch=epoch, step=progress["step"], total_steps=total_steps,
                             loss=round(mean_loss, 5), lr=scheduler.get_last_lr()[0],
                             tokens_per_second=round(progress["tokens"] / max(time.monotonic() - segment_start
                                                                              + progress["train_seconds"], 1e-9), 1))
                if kill_at is not None and progress["step"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if progress["step"] % config.checkpoint_steps == 0 and progress["batch"] < len(batches):
                    progress["train_seconds"] += time.monotonic() - segment_start
                    segment_start = time.monotonic()
                    checkpoint()

            # End of epoch: metrics on the epoch's own training predictions, then a validation pass.
            progress["epoch_seconds"].append(round(time.monotonic() - epoch_started, 3))
            progress["epoch_tokens"].append(progress["tokens"] - tokens_before)
            train_metrics = regression_metrics(epoch_preds.cpu().numpy(), train_data.labels)
            if float(token_loss[1]) > 0:
                train_metrics["token_loss"] = float(token_loss[0] / token_loss[1])
            val_pred, val_extra = task.validate(model, val_data, device, autocast_dtype)
            val_metrics = {**regression_metrics(val_pred, val_data.labels), **val_extra}
            progress["history"].append({"epoch": epoch, "train": train_metrics, "val": val_metrics})
            log.info("epoch_done", epoch=epoch, train_mae=round(train_metrics["mae"], 4), val_mae=round(val_metrics["mae"], 4),
                     val_rmse=round(val_metrics["rmse"], 4))
            if progress["best_val_mae"] is None or val_metrics["mae"] < progress["best_val_mae"]:
                progress["best_val_mae"], progress["best_epoch"] = val_metrics["mae"], epoch
                task.save(model, out / "model")
            write_json_atomic(progress["history"], out / "training_history.json")
            progress["epoch"], progress["batch"] = epoch + 1, 0
            epoch_preds.zero_()
            token_loss.zero_()
            progress["train_seconds"] += time.monotonic() - segment_start
            segment_start = time.monotonic()
            checkpoint()

    metadata = build_metadata(config, base, train_data, val_data, total_params, trainable_params, warmup, progress,
                              device, time.monotonic() - started)
    metadata["steps_per_epoch"] = steps_per_epoch
    write_json_atomic(metadata, out / "training_metadata.json")
    from .reports import write_training_reports

    write_training_reports(out, progress["history"], metadata, progress["step_losses"])
    log.info("training_done", out=str(out), best_val_mae=metadata["best_val_mae"], best_epoch=progress["best_epoch"],
             wall_time_s=metadata["wall_time_s"], tokens_per_second=metadata["tokens_per_second"])
    return metadata


def init_head_bias(model: Any, label_mean: np.ndarray) -> bool:
    """Start the head at the label mean where it has a bias (BERT's classifier; Qwen2's score has none).

    A fresh head predicts about 0; starting at the mean spares the first epoch walking there.
    """
    import torch

    for name, module in model.named_modules():
        if name.endswith(("classifier.modules_to_save.default", "score.modules_to_save.default")):
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                with torch.no_grad():
                    module.bias.copy_(torch.as_tensor(label_mean, dtype=module.bias.dtype))
                return True
    return False


def save_model(model: Any, tokenizer: Any, dest: Path) -> None:
    """Adapter + head (safetensors) + tokenizer, swapped into place whole."""
    def fill(work: Path) -> None:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / "regression_head.json").write_text(json.dumps({"dimensions": list(DIMENSIONS), "num_labels": len(DIMENSIONS),
                                                              "head_in_adapter": True}, indent=2))

    write_dir_atomic(dest, fill)


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"investment-risk": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "tokenizers", "safetensors", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def build_metadata(config: TrainConfig, base: Any, train_data: SplitData, val_data: SplitData, total_params: int,
                   trainable_params: int, warmup: int, progress: dict[str, Any], device: Any, wall: float) -> dict[str, Any]:
    spec = default_spec()
    train_seconds = max(progress["train_seconds"], 1e-9)
    return {
        "filter_name": spec.name, "filter_version": spec.version, "dimension_names": list(DIMENSIONS),
        "num_dimensions": len(DIMENSIONS), "model_name": config.base_model, "num_parameters": total_params,
        "num_trainable_parameters": trainable_params, "epochs": config.epochs, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "max_length": config.max_length, "warmup_steps": warmup,
        "train_examples": train_data.table.num_rows, "val_examples": val_data.table.num_rows,
        "best_val_mae": progress["best_val_mae"], "include_prompt": config.mode == "instruction",
        "training_mode": config.mode,
        **({"prompt_max_length": train_data.prompt_max_length} if train_data.prompt_max_length else {}),
        # beyond the contract's list
        "best_epoch": progress["best_epoch"], "warmup_steps_requested": config.warmup_steps,
        "gradient_accumulation_steps": config.grad_accum, "effective_batch_size": config.batch_size * config.grad_accum,
        "seed": config.seed, "base_model_path": str(base.path), "base_model_revision": base.revision,
        "device": str(device), "package_versions": _package_versions(), "wall_time_s": round(wall, 2),
        "train_seconds": round(train_seconds, 2), "train_tokens": progress["tokens"],
        "tokens_per_second": round(progress["tokens"] / train_seconds, 1),
        "epoch_seconds": progress.get("epoch_seconds", []), "epoch_tokens": progress.get("epoch_tokens", []),
        "train_label_mean": [float(x) for x in train_data.labels.mean(axis=0)],
        "config": config.to_json(),
    }


def dry_run(config: TrainConfig) -> dict[str, Any]:
    """Validate data and options and count parameters on the meta device; loads no weights, writes nothing."""
    from .models import load_tokenizer, parameter_counts, regression_model, resolve_base_model

    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} already exists and is not empty; pass --resume to continue it or choose another")
    base = resolve_base_model(config.base_model, need_weights=False)
    tokenizer = load_tokenizer(base.path) if base.has_tokenizer else None
    train_table, val_table = read_split(Path(config.data), "train"), read_split(Path(config.data), "val")
    if train_table.num_rows < config.batch_size:
        raise InputError(f"{Path(config.data) / 'train.parquet'}: {train_table.num_rows} rows are too few for one batch "
                         f"of --batch-size {config.batch_size}")
    if config.mode == "instruction":
        from .instruct_train import causal_lm

        lm, lm_config = causal_lm(base, meta=True, train_embeddings=config.train_embeddings)
        trainable, total = lm.get_nb_trainable_parameters()
        head = lm_config.hidden_size * len(DIMENSIONS) + len(DIMENSIONS)  # the score head, trained in full
        total, trainable = total + head, trainable + head
    else:
        total, trainable = parameter_counts(regression_model(base, tokenizer, meta=True))
    batches = math.ceil(train_table.num_rows / config.batch_size)
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    report: dict[str, Any] = {
        "base_model": config.base_model, "base_model_path": str(base.path), "mode": config.mode,
        "num_parameters": total, "num_trainable_parameters": trainable, "train_examples": train_table.num_rows,
        "val_examples": val_table.num_rows, "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * config.epochs,
        "warmup_steps": warmup_for(config, steps_per_epoch * config.epochs),
    }
    if tokenizer is not None:
        for name, table in (("train", train_table), ("val", val_table)):
            lengths = np.array([len(t) for t in encode(tokenizer, texts_of(table), config.max_length)])
            report[f"{name}_tokens"] = int(lengths.sum())
            report[f"{name}_mean_tokens"] = round(float(lengths.mean()), 1)
            report[f"{name}_truncated_share"] = round(float((lengths >= config.max_length).mean()), 4)
    return report
