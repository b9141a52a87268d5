"""The training recipe, top to bottom: set up, then epochs of length-grouped micro-batches, then the run package.

    config -> data (validated, tokenised once) -> model (base + LoRA + head) -> for each epoch: run_epoch (forward,
    backward, step, log, checkpoint) and end_of_epoch (validate, keep the best model, history, checkpoint) ->
    finish (metadata and reports)

Everything the loop carries between steps is in a typed `TrainState` (plus the on-device `Sums`), saved in every
checkpoint, so `--resume` ends with the same history as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import read_json, write_json_atomic
from ..core.faults import kill_now
from ..core.errors import ConfigError, InputError, Terminated
from ..core.logs import Progress, get_logger
from ..core.signals import StopRequest
from ..core.metrics import calibration_metrics, regression_metrics
from ..core.spec import DIMENSIONS, NUM_DIMENSIONS, default_spec
from ..modeling.predict import pick_device
from ..modeling.tokens import length_grouped_batches, to_device
from .config import TrainConfig, plan_steps
from .data import SplitData
from .run_dir import CONFIG_FILE, check_same_base, claimed_out_dir, has_checkpoint, save_run_config

METADATA_FILE = "training_metadata.json"  # the run package's last file: with it the run is finished


@dataclass
class TrainState:
    """Where training is and what it has seen; a checkpoint holds exactly this (and the Sums)."""

    epoch: int = 1  # the epoch in progress
    batch: int = 0  # its next micro-batch
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_mae: float | None = None
    best_epoch: int | None = None
    step_losses: list[list[float]] = field(default_factory=list)  # [step, mean loss] every log_every steps
    tokens: int = 0
    train_seconds: float = 0.0  # time in the loop, across resumes
    wall_seconds: float = 0.0  # time since the run started (set-up, validation and checkpoints too), across resumes
    since_log: int = 0  # micro-batches since the last train_step line
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_tokens: list[int] = field(default_factory=list)
    # where the epoch in progress began (loop seconds, tokens): a resumed epoch counts its part before the stop too
    epoch_start: tuple[float, int] | None = None
    best_val_predictions: list[list[float]] | None = None  # the best epoch's, to fit the calibration on

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> "TrainState":
        if not isinstance(saved, dict) or not {"epoch", "batch", "step"} <= saved.keys():  # else a resume at step 0
            raise InputError("the checkpoint's training state is damaged (no epoch, batch and step)")
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass
class Sums:
    """Per-epoch sums kept on the device (no host sync per step), saved with the state."""

    epoch_preds: Any  # (train rows, 8): each row's prediction this epoch, for the train metrics
    running: Any  # loss summed since the last log line
    token_loss: Any  # instruction mode: the epoch's token loss sum and count

    def tensors(self) -> dict[str, Any]:
        return {"epoch_preds": self.epoch_preds, "running": self.running, "token_loss": self.token_loss}


@dataclass
class Session:
    """What setup builds once: the data, the model and its optimizer, and the step arithmetic."""

    config: TrainConfig
    out: Path
    base: Any
    device: Any
    autocast_dtype: Any
    task: Any
    train_data: SplitData
    val_data: SplitData
    model: Any
    optimizer: Any
    scheduler: Any
    trainable: list[Any]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    wall_mark: float = field(default_factory=time.monotonic)  # wall_seconds counts from here
    segment_start: float = field(default_factory=time.monotonic)  # train_seconds counts from here
    last_log: tuple[float, int] = (0.0, 0)  # (monotonic time, state.tokens) at the last train_step line
    # SIGTERM while the epochs run: the step under way finishes, a checkpoint, then stop (the train Job's grace
    # period leaves time for a validation pass)
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def loop_seconds(self, state: TrainState) -> float:
        """Seconds in the training loop across resumes: those banked in the state and this segment's."""
        return state.train_seconds + time.monotonic() - self.segment_start

    def bank_time(self, state: TrainState) -> None:
        """Add the time since the last bank to the state (as a checkpoint is written: what a resume continues)."""
        now = time.monotonic()
        state.train_seconds += now - self.segment_start
        state.wall_seconds += now - self.wall_mark
        self.segment_start = self.wall_mark = now


def make_task(config: TrainConfig, tokenizer: Any) -> Any:
    if config.mode == "instruction":
        from .instruction import InstructionTask

        return InstructionTask(config, tokenizer)
    from .distillation import DistillationTask

    return DistillationTask(config, tokenizer)


def setup(config: TrainConfig, resume: bool) -> Session:
    """Data, model, optimizer (the head at a larger rate) and the linear warm-up/decay schedule."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from ..modeling.presets import check_base, load_tokenizer, resolve_base_model

    started = time.monotonic()  # the run's wall time counts its set-up (loading, tokenising) too
    out = Path(config.out)  # claimed by train()
    device = pick_device(config.device)
    base = resolve_base_model(config.base_model)
    check_base(base, config.mode, config.max_length)
    tokenizer = load_tokenizer(base.path)
    if resume:
        check_same_base(config, base)
    else:
        save_run_config(config, base.revision)
    task = make_task(config, tokenizer)
    train_data, val_data = task.prepare(out / "cache")

    torch.manual_seed(config.seed)
    on_cuda = device.type == "cuda"
    # bf16 on CUDA: the frozen base in bf16 under autocast, adapter and head in fp32. fp32 on CPU.
    model = task.build_model(base, torch.bfloat16 if on_cuda else torch.float32, train_data.labels.mean(axis=0))
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The head is trained in full and starts from scratch: it gets a larger step than the adapter.
    head = [p for n, p in model.named_parameters() if p.requires_grad and task.is_head(n)]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not task.is_head(n)]
    optimizer = torch.optim.AdamW(
        [{"params": adapter, "lr": config.learning_rate},
         {"params": head, "lr": config.learning_rate * config.head_lr_multiplier}],
        weight_decay=config.weight_decay, fused=on_cuda or None)
    plan = plan_steps(config, train_data.table.num_rows)
    if plan.warmup < config.warmup_steps:
        get_logger().info("warmup_capped", requested=config.warmup_steps, used=plan.warmup,
                          total_steps=plan.total_steps, reason="warm-up is capped at 10% of all optimizer steps")
    if config.compile:
        compile_blocks(model)
    return Session(
        config=config, out=out, base=base, device=device, autocast_dtype=torch.bfloat16 if on_cuda else None,
        task=task, train_data=train_data, val_data=val_data, model=model, optimizer=optimizer,
        scheduler=get_linear_schedule_with_warmup(optimizer, plan.warmup, plan.total_steps), trainable=trainable,
        batches_per_epoch=plan.batches_per_epoch, steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
        warmup=plan.warmup, wall_mark=started)


def compile_blocks(model: Any) -> None:
    """torch.compile each transformer block in place (the classes transformers keeps whole, `_no_split_modules`),
    with dynamic shapes. Compiling fuses the many small ops of LoRA layers and norms (the whole
    model compiled took a step from 35k to 60k tokens/s on an H200), but compiling the whole model cost a 1.5B model
    143 s on an H100 at its first batch and 210 s more at the second batch length: every new shape recompiled it.
    Identical blocks share their kernels, any batch shape reuses them, and parameter names stay as they are for
    checkpoints and the adapter. A pooled last block (`pooled_block`) stays eager: its own code would be one more
    compilation for a block that does a fraction of the others' work."""
    from transformers import PreTrainedModel

    from ..modeling.pooled_block import POSITIONS

    names = {name for m in model.modules() if isinstance(m, PreTrainedModel) for name in m._no_split_modules or ()}
    for block in [m for m in model.modules() if type(m).__name__ in names and not hasattr(m, POSITIONS)]:
        block.compile(dynamic=True)


def start_or_resume(session: Session, resume: bool) -> tuple[TrainState, Sums]:
    import torch

    from .checkpoint import load_checkpoint, resumable_checkpoints

    device = session.device
    state = TrainState()
    sums = Sums(epoch_preds=torch.zeros((session.train_data.table.num_rows, NUM_DIMENSIONS), device=device),
                running=torch.zeros((), device=device), token_loss=torch.zeros(2, device=device))
    candidates = resumable_checkpoints(session.checkpoints) if resume else []
    if resume and not candidates and has_checkpoint(session.out):
        raise InputError(f"--resume: {session.checkpoints / 'latest.json'} names a checkpoint, but no checkpoint "
                         "folder is left: start a new run in another --out")
    for tried, candidate in enumerate(candidates):
        try:
            saved, extra = load_checkpoint(candidate, session.model, session.optimizer, session.scheduler, device)
            state, sums = TrainState.from_json(saved), Sums(**extra)
        except InputError as exc:  # each load restores everything: a partial one is overwritten by the next
            get_logger().warning("checkpoint_unusable", checkpoint=candidate.name, reason=str(exc))
            continue
        if tried:
            fell_back(session, state, candidate, candidates[:tried])
        get_logger().info("resumed", checkpoint=candidate.name, epoch=state.epoch, batch=state.batch, step=state.step)
        if not finished(session, state):
            restore_best_model(session, state)
        return state, sums
    if candidates:
        raise InputError(f"--resume: no checkpoint in {session.checkpoints} can be loaded (each is logged as "
                         "checkpoint_unusable); start a new run in another --out")
    return state, sums


def fell_back(session: Session, state: TrainState, used: Path, damaged: list[Path]) -> None:
    """Resuming from an older checkpoint than the newest: refused where an epoch after it was saved to model/ as
    the best (model/ would hold weights no state describes if its rerun came out otherwise, as on a GPU); the
    damaged checkpoints are removed (else keeping the newest two could keep them and drop the good one)."""
    history = read_json(session.out / "training_history.json") if (session.out / "training_history.json").exists() else []
    best = state.best_val_mae if state.best_val_mae is not None else math.inf
    ahead = [h["epoch"] for h in history if h["epoch"] >= state.epoch and h["val"]["mae"] < best]
    if ahead:
        raise InputError(f"--resume: {', '.join(p.name for p in damaged)} damaged, and {used.name} (epoch "
                         f"{state.epoch}) precedes epoch {ahead[0]}, whose weights model/ holds as the best: start a "
                         "new run in another --out")
    for path in damaged:
        shutil.rmtree(path, ignore_errors=True)
        get_logger().warning("checkpoint_removed", checkpoint=path.name, reason="damaged; resumed from an older one")


def checkpoint(session: Session, state: TrainState, sums: Sums) -> None:
    from .checkpoint import save_checkpoint

    save_checkpoint(session.checkpoints, state.step, session.model, session.optimizer, session.scheduler,
                    state.to_json(), sums.tensors(), session.out / CONFIG_FILE)


def _kill_point() -> int | None:
    """Test hook: SIGKILL (or `_INVESTMENT_RISK_KILL_SIGNAL`) this process after the given optimizer step."""
    value = os.environ.get("_INVESTMENT_RISK_KILL_AT_STEP")
    return int(value) if value else None


def run_epoch(session: Session, state: TrainState, sums: Sums, bar: Progress) -> None:
    """The epoch's remaining micro-batches: forward, backward, and an optimizer step every grad_accum of them."""
    import torch

    config, device, task = session.config, session.device, session.task
    data = session.train_data
    lengths = data.lengths
    labels = torch.from_numpy(data.labels).to(device)
    kill_at = _kill_point()
    batches = length_grouped_batches(lengths, config.batch_size, config.seed, state.epoch)
    session.model.train()
    session.last_log = (time.monotonic(), state.tokens)
    for b in range(state.batch, len(batches)):
        idx = batches[b]
        idx_t = to_device(idx, device)
        loss, preds, token_loss = task.loss_and_preds(session.model, data, idx, labels[idx_t], device,
                                                      session.autocast_dtype)
        if token_loss is not None:
            sums.token_loss += torch.stack([token_loss.detach(), torch.ones((), device=device)])
        group_start = (b // config.grad_accum) * config.grad_accum
        group_size = min(config.grad_accum, len(batches) - group_start)
        (loss / group_size).backward()
        sums.epoch_preds[idx_t] = preds.detach()
        sums.running += loss.detach()
        state.since_log += 1
        state.tokens += int(lengths[idx].sum())
        bar.update(1)
        if b + 1 - group_start < group_size:
            continue  # accumulate more micro-batches before stepping
        torch.nn.utils.clip_grad_norm_(session.trainable, config.max_grad_norm)
        session.optimizer.step()
        session.scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch = b + 1
        if state.step % config.log_every == 0:
            log_step(session, state, sums)
        if kill_at is not None and state.step == kill_at:
            kill_now()
        stopping = session.stop.requested
        if (stopping or state.step % config.checkpoint_steps == 0) and state.batch < len(batches):
            session.bank_time(state)
            checkpoint(session, state, sums)
            if stopping:  # (at an epoch's last step, end_of_epoch checkpoints and train() stops after it)
                raise stopped(state)


def stopped(state: TrainState) -> Terminated:
    get_logger().warning("checkpointed_on_sigterm", epoch=state.epoch, step=state.step,
                         reason="SIGTERM: stopped at a step's end; --resume continues from this step")
    return Terminated()


def log_step(session: Session, state: TrainState, sums: Sums) -> None:
    mean_loss = float(sums.running.item()) / state.since_log
    if not math.isfinite(mean_loss):  # read here, where the loss is synced anyway: no extra wait per step
        raise diverged(session, state, f"the loss is {mean_loss}")
    sums.running.zero_()
    state.since_log = 0
    state.step_losses.append([state.step, mean_loss])
    now, seconds = time.monotonic(), session.loop_seconds(state)
    (then, tokens_then), session.last_log = session.last_log, (now, state.tokens)
    # Since the start (compilation and all) and since the last line (the rate the run is going at now).
    get_logger().info("train_step", epoch=state.epoch, step=state.step, total_steps=session.total_steps,
                      loss=round(mean_loss, 5), lr=session.scheduler.get_last_lr()[0],
                      tokens_per_second=round(state.tokens / max(seconds, 1e-9), 1),
                      recent_tokens_per_second=round((state.tokens - tokens_then) / max(now - then, 1e-9), 1))


def diverged(session: Session, state: TrainState, what: str) -> ConfigError:
    """A run whose loss went non-finite would end with a NaN model that exports, scores and ranks as if whole: it
    stops instead (exit 2: the same settings diverge again)."""
    config = session.config
    return ConfigError(f"training diverged at step {state.step} (epoch {state.epoch}): {what}; train again with a "
                       f"lower --learning-rate (now {config.learning_rate:g}) or --head-lr-multiplier "
                       f"(now {config.head_lr_multiplier:g})")


def end_of_epoch(session: Session, state: TrainState, sums: Sums) -> None:
    """Train metrics from the epoch's own predictions, a validation pass, the best model kept, a checkpoint."""
    data, val = session.train_data, session.val_data
    if session.device.type == "cuda":
        import torch

        torch.cuda.synchronize()  # the epoch's last steps may still be queued on the GPU
    started_s, tokens_before = state.epoch_start or (0.0, 0)
    state.epoch_seconds.append(round(session.loop_seconds(state) - started_s, 3))
    state.epoch_tokens.append(state.tokens - tokens_before)
    state.epoch_start = None
    # Metrics of the scores as every later stage gives them, clipped to the score range (the best epoch is chosen
    # on them): a head's raw output below 0 or above 10 is never a score.
    clip = default_spec().clip
    train_metrics = regression_metrics(clip(sums.epoch_preds.cpu().numpy()), data.labels)
    if float(sums.token_loss[1]) > 0:
        train_metrics["token_loss"] = float(sums.token_loss[0] / sums.token_loss[1])
    val_pred, val_extra = session.task.validate(session.model, val, session.device, session.autocast_dtype)
    val_pred = clip(np.asarray(val_pred, dtype=np.float32))
    val_metrics = {**regression_metrics(val_pred, val.labels), **val_extra}
    if not (math.isfinite(train_metrics["mae"]) and math.isfinite(val_metrics["mae"])):
        raise diverged(session, state, "its scores are not finite")
    state.history.append({"epoch": state.epoch, "train": train_metrics, "val": val_metrics})
    get_logger().info("epoch_done", epoch=state.epoch, train_mae=round(train_metrics["mae"], 4),
                      val_mae=round(val_metrics["mae"], 4), val_rmse=round(val_metrics["rmse"], 4))
    improved = state.best_val_mae is None or val_metrics["mae"] < state.best_val_mae
    if improved:
        state.best_val_mae, state.best_epoch = val_metrics["mae"], state.epoch
        state.best_val_predictions = val_pred.round(5).tolist()
    write_json_atomic(state.history, session.out / "training_history.json")
    state.epoch, state.batch = state.epoch + 1, 0
    sums.epoch_preds.zero_()
    sums.token_loss.zero_()
    session.bank_time(state)
    checkpoint(session, state, sums)
    # Saved after the checkpoint that calls this epoch best, never before: model/ is then never ahead of what a
    # resume believes (a GPU's rerun of the epoch differs, and model/ would stay with weights no state describes).
    # A kill in between is repaired by the resume (`restore_best_model`).
    if improved:
        session.task.save(session.model, session.out / "model")


def finished(session: Session, state: TrainState) -> bool:
    """Every epoch done and the run package written (its metadata last): a resume (a retried train pod's) has
    nothing to do, and doing `finish` again would put the training calibration back over a `calibrate` refit."""
    return state.epoch > session.config.epochs and (session.out / METADATA_FILE).exists()


def restore_best_model(session: Session, state: TrainState) -> None:
    """Resuming from the checkpoint taken at the end of the best epoch: its weights are the best model, whose save
    that checkpoint precedes and a kill may have stopped. Saving them again costs seconds and is the same file."""
    if state.batch == 0 and state.best_epoch is not None and state.best_epoch == state.epoch - 1:
        session.task.save(session.model, session.out / "model")


def finish(session: Session, state: TrainState) -> dict[str, Any]:
    from .metadata import build_metadata
    from .reports import write_training_reports

    calibration = fit_run_calibration(session, state)  # before the metadata: its wall time counts the fit
    metadata = build_metadata(session, state)
    metadata["calibration"] = calibration
    write_training_reports(session.out, state.history, metadata, state.step_losses, session.train_data.labels)
    write_json_atomic(metadata, session.out / METADATA_FILE)  # last: with it the run is finished (`finished`)
    get_logger().info("training_done", out=str(session.out), best_val_mae=metadata["best_val_mae"],
                      best_epoch=state.best_epoch, wall_time_s=metadata["wall_time_s"],
                      tokens_per_second=metadata["tokens_per_second"])
    return metadata


def fit_run_calibration(session: Session, state: TrainState) -> dict[str, Any]:
    """Fit the per-dimension isotonic map on the best epoch's validation predictions and store it beside the weights;
    the val metrics raw and calibrated (in-sample on val: the test split says how it generalises). Articles the
    prefilter calls noise are left out: scoring never applies the map to them, and their low labels would bend it."""
    from ..modeling.calibration import CALIBRATION_FILE, fit_calibration

    spec = default_spec()
    scored = ~spec.prefiltered(session.val_data.table)
    raw = spec.clip(np.asarray(state.best_val_predictions, dtype=np.float32))[scored]
    labels = session.val_data.labels[scored]
    try:
        calibration = fit_calibration(raw, labels, {"split": "val", "epoch": state.best_epoch,
                                                    "rows_prefiltered_left_out": int((~scored).sum())})
    except InputError as exc:  # too few validation rows: the model is still usable, uncalibrated
        get_logger().warning("calibration_skipped", reason=str(exc))
        return {"fitted": False, "reason": str(exc)}
    write_json_atomic(calibration.to_json(), session.out / "model" / CALIBRATION_FILE)
    calibrated = calibration.apply(raw)
    before, after = regression_metrics(raw, labels), regression_metrics(calibrated, labels)
    error_before = calibration_metrics(raw, labels)["calibration_error"]
    error_after = calibration_metrics(calibrated, labels)["calibration_error"]
    get_logger().info("calibration_fitted", val_mae_raw=round(before["mae"], 4), val_mae_calibrated=round(after["mae"], 4),
                      val_calibration_error_raw=round(error_before, 4),
                      val_calibration_error_calibrated=round(error_after, 4))
    return {"fitted": True, "file": f"model/{CALIBRATION_FILE}", "val_mae_raw": before["mae"],
            "val_mae_calibrated": after["mae"], "val_calibration_error_raw": error_before,
            "val_calibration_error_calibrated": error_after, "per_dimension": {
                d: {"raw": before[f"{d}_mae"], "calibrated": after[f"{d}_mae"]} for d in DIMENSIONS}}


def train(config: TrainConfig, resume: bool = False, resume_if_present: bool = False) -> dict[str, Any]:
    """Train, checkpoint and write the run package (`resume_if_present`: continue --out if it holds a checkpoint,
    else start it). Returns the training metadata."""
    from ..modeling.networks import parameter_counts

    with claimed_out_dir(config, resume, resume_if_present) as resume:
        session = setup(config, resume)
        state, sums = start_or_resume(session, resume)
        if finished(session, state):
            get_logger().info("training_already_complete", out=str(session.out), best_epoch=state.best_epoch)
            return read_json(session.out / METADATA_FILE)
        total_params, trainable_params = parameter_counts(session.model)
        get_logger().info("training_start", mode=config.mode, base_model=config.base_model, device=str(session.device),
                          train_examples=session.train_data.table.num_rows, val_examples=session.val_data.table.num_rows,
                          parameters=total_params, trainable_parameters=trainable_params,
                          steps_per_epoch=session.steps_per_epoch, total_steps=session.total_steps,
                          warmup_steps=session.warmup)
        session.segment_start = time.monotonic()
        done_before = (state.epoch - 1) * session.batches_per_epoch + state.batch  # a resumed run's earlier batches
        with Progress(total=session.batches_per_epoch * config.epochs, what="train", unit="batches",
                      already_done=done_before) as bar, session.stop.catching():
            while state.epoch <= config.epochs:
                if state.epoch_start is None or state.batch == 0:  # else resumed inside it: from where it began
                    state.epoch_start = (session.loop_seconds(state), state.tokens)
                run_epoch(session, state, sums, bar)
                end_of_epoch(session, state, sums)
                if session.stop.requested:  # the end of an epoch: end_of_epoch has just checkpointed
                    raise stopped(state)
        return finish(session, state)
