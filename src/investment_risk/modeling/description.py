"""One typed description of a scoring model, read from an exported model's model.json or a training run.

It answers everything scoring and evaluation ask of a model: what it reads (an article, or an instruction
prompt), how many tokens, the pad id, its version and source run, and the training means for a baseline.
An exported directory is checked against the sha256 in its model.json before anything trusts it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import READ_ONLY, REPLACE_JOURNAL, finish_replace, read_json, replace_pending, sha256_file
from ..core.drift import REFERENCE_FILE, check_reference
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.spec import DIMENSIONS
from .calibration import CALIBRATION_FILE, Calibration, load_calibration
from .tokens import TRUNCATIONS

INPUT_FORMATS = ("article", "instruction")
RUN_CONFIG_FILE = "training_config.json"  # a run's resolved hyperparameters and its data's sha256
JOURNAL_WAIT_S = 10.0  # how long a read-only reader waits for a live calibrate to finish its renames
INT8_FILE = "model.int8.onnx"  # the static int8 (NNCF, QDQ) twin of model.onnx, for openvino-int8
DYNAMIC_INT8_FILE = "model.int8-dynamic.onnx"  # ONNX Runtime's dynamic int8 twin, for onnxruntime-int8
# The engines that can score an exported model on CPUs (loading.cpu_runner), ONNX Runtime fp32 first: the reference
# the others are measured against. openvino-int8 runs INT8_FILE in bf16 where the CPU has bf16 units, else in f32.
CPU_ENGINES = ("onnxruntime", "onnxruntime-int8", "openvino-int8", "openvino-bf16", "openvino-f32")
# The file beside model.onnx that an engine runs instead of it: made at export as a candidate, shipped only if chosen.
TWIN_FILES = {"onnxruntime-int8": DYNAMIC_INT8_FILE, "openvino-int8": INT8_FILE}


def onnx_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.name.startswith(("model.onnx", *TWIN_FILES.values())))


def model_digest(model_dir: Path) -> dict[str, str]:
    """sha256 of everything that decides an exported model's scores (its ONNX files and its calibration) and of the
    score reference its batches are compared with."""
    files = onnx_files(model_dir) + [p for p in (model_dir / CALIBRATION_FILE, model_dir / REFERENCE_FILE) if p.exists()]
    return {p.name: sha256_file(p) for p in files}


def model_version(digests: dict[str, str]) -> str:
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelDescription:
    path: Path
    exported: bool  # an ONNX model directory (model.json), else a training run
    input_format: str  # "article" (title + content) or "instruction" (the instruction prompt + article)
    max_length: int  # tokens one input may take (an instruction run's prompt budget)
    pad_token_id: int | None  # None: the tokenizer's
    model_version: str
    source_run: Path  # the training run (the run itself when not exported)
    tokenizer_dir: Path
    train_label_mean: tuple[float, ...] | None  # the predict-the-mean baseline, when the run is here
    cpu_engine: str = "onnxruntime"  # what scores the exported file on CPUs (chosen by measurement at export)
    cpu_engine_measured_on: dict[str, Any] | None = None  # the CPU export measured the engines on (loading.cpu_profile)
    truncation: str = "head"  # how a long article is cut to max_length, as in training
    calibration: Calibration | None = None  # the per-dimension map from raw to calibrated scores, when fitted
    reference: dict[str, Any] | None = None  # exported models: the validation scores' distribution, for drift
    dtype: str = "fp32"  # exported models: the graph's precision (a bf16 graph runs on CUDA only)

    @property
    def is_instruction(self) -> bool:
        return self.input_format == "instruction"

    def pad_id(self, tokenizer: Any) -> int:
        """The pad token the graph was exported with (model.json), else the tokenizer's."""
        return int(tokenizer.pad_token_id if self.pad_token_id is None else self.pad_token_id)

    def token_rows(self, tokenizer: Any, titles: list[str | None], contents: list[str | None]) -> list[np.ndarray]:
        """What the model reads for each article: the article, or the instruction prompt around it."""
        if self.is_instruction:
            from .prompts import prompt_tokens

            return prompt_tokens(tokenizer, titles, contents, self.max_length)
        from .tokens import article_text, encode

        return encode(tokenizer, [article_text(t, c) for t, c in zip(titles, contents)], self.max_length,
                      truncation=self.truncation)

    def calibrated(self, raw: np.ndarray, use: bool = True) -> np.ndarray:
        """The model's final scores from its raw (clipped) ones: calibrated where it has a calibration and `use`."""
        return self.calibration.apply(raw) if use and self.calibration is not None else raw


def describe_model(path: Path) -> ModelDescription:
    """The description of an exported model directory or a training run; anything else is an error (exit 2)."""
    for name, describe in (("model.json", _exported), ("training_metadata.json", _run)):
        if (path / name).exists():
            try:
                description = describe(path)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of the wrong kind
                what = f"no {exc.args[0]!r} field" if isinstance(exc, KeyError) else f"a malformed field ({exc})"
                raise InputError(f"{path / name}: {what}") from None
            if description.truncation not in TRUNCATIONS:
                raise InputError(f"{path / name}: truncation {description.truncation!r} is not one of "
                                 f"{', '.join(TRUNCATIONS)}")
            return description
    raise InputError(f"{path}: neither an exported model (model.json) nor a training run (training_metadata.json)")


def _input_format(metadata: dict[str, Any]) -> str:
    return "instruction" if metadata.get("training_mode") == "instruction" else "article"


def _label_mean(run_meta: dict[str, Any] | None, source: Path) -> tuple[float, ...] | None:
    mean = (run_meta or {}).get("train_label_mean")
    try:
        return tuple(float(x) for x in mean) if mean else None
    except (TypeError, ValueError):
        raise InputError(f"{source}: train_label_mean is not a list of numbers") from None


def _run(path: Path) -> ModelDescription:
    metadata = read_json(path / "training_metadata.json")
    if not (path / "model" / "adapter_model.safetensors").exists():
        raise InputError(f"{path}: not a finished training run (needs model/adapter_model.safetensors; pickle files "
                         "are never loaded)")
    return ModelDescription(
        path=path, exported=False, input_format=_input_format(metadata),
        max_length=int(metadata.get("prompt_max_length") or metadata["max_length"]), pad_token_id=None,
        model_version=run_version(path), source_run=path, tokenizer_dir=path / "model",
        train_label_mean=_label_mean(metadata, path / "training_metadata.json"), truncation=str(metadata.get("truncation", "head")),
        calibration=load_calibration(path / "model"))


def run_data_sha256(run: Path) -> dict[str, str]:
    """The sha256 of the split files a run trained and validated on ({} when its config is not there)."""
    saved = run / RUN_CONFIG_FILE
    digests = read_json(saved).get("data_sha256") if saved.is_file() else None
    return dict(digests) if isinstance(digests, dict) else {}


def data_sha256(data: Path) -> str | None:
    """The sha256 of a labelled file (None for a folder or glob of them), to tell whether a model has seen it."""
    return sha256_file(Path(data)) if Path(data).is_file() else None


def in_sample(model: ModelDescription, digest: str | None) -> list[str]:
    """What of `model` has seen the labelled file of sha256 `digest` already: its training ("trained on it": the
    run's train split) and its calibration ("calibration fitted on it": the validation split training fitted it on,
    or the file `calibrate` refitted it on). Metrics on such a file are optimistic; [] for new data."""
    if digest is None:
        return []
    splits = {split for split, known in run_data_sha256(model.source_run).items() if known == digest}
    seen = ["trained on it"] if "train" in splits else []
    fitted_on = model.calibration.fitted_on if model.calibration is not None else {}
    if fitted_on.get("sha256") == digest or (fitted_on.get("split") == "val" and "val" in splits):
        seen.append("calibration fitted on it")
    return seen


def run_version(run: Path) -> str:
    """A run's model_version: its name, and its calibration's sha256 when it has one (a run `calibrate` refitted
    scores differently: its scored files and merged metrics must say which calibration made them)."""
    calibration = run / "model" / CALIBRATION_FILE
    return f"run:{run.name}" + (f"@{sha256_file(calibration)[:12]}" if calibration.exists() else "")


def _exported(path: Path) -> ModelDescription:
    for attempt in range(2):
        info = read_model_json(path)
        calibration, reference = load_calibration(path), load_reference(path)
        # The calibration and reference read are the ones hashed (a calibrate may have replaced them in between)
        if _unchanged(path, info, (CALIBRATION_FILE, REFERENCE_FILE)):
            break
        if attempt:
            raise InputError(f"{path}: its calibration changed while it was read, twice; try again")
    if info.get("input_format", "article") not in INPUT_FORMATS:
        raise InputError(f"{path / 'model.json'}: input_format {info['input_format']!r} is not one of "
                         f"{', '.join(INPUT_FORMATS)}")
    if problem := _model_json_problem(info):  # not hashed, so checked: a hand edit scored under a false name
        raise InputError(f"{path / 'model.json'}: {problem}; re-export the model")
    source = Path(info["source_run"])
    run_meta = read_json(source / "training_metadata.json") if (source / "training_metadata.json").exists() else None
    return ModelDescription(
        path=path, exported=True, input_format=info.get("input_format", "article"), max_length=info["max_length"],
        pad_token_id=info.get("pad_token_id"), model_version=str(info["model_version"]), source_run=source,
        tokenizer_dir=path, train_label_mean=_label_mean(run_meta, source / "training_metadata.json"),
        cpu_engine=(info.get("cpu_engine") or {}).get("engine", "onnxruntime"),
        cpu_engine_measured_on=(info.get("cpu_engine") or {}).get("measured_on"),
        truncation=str(info.get("truncation", "head")), calibration=calibration,
        reference=reference, dtype=str(info.get("dtype", "fp32")))


def _model_json_problem(info: dict[str, Any]) -> str:
    """What in model.json (whose files' sha256 read_model_json checked) no export writes."""
    if info.get("model_version") != model_version(info["sha256"]):
        return f"model_version {info.get('model_version')!r} is not the one its files' sha256 give"
    if "max_length" in info and not (isinstance(info["max_length"], int) and 8 <= info["max_length"] <= 32768):
        return f"max_length {info.get('max_length')!r} is not a token count in [8, 32768]"
    if info.get("pad_token_id") is not None and not isinstance(info["pad_token_id"], int):
        return f"pad_token_id {info['pad_token_id']!r} is not a token id"
    engine = info.get("cpu_engine") or {}
    if not isinstance(engine, dict) or not isinstance(engine.get("measured_on", {}), (dict, type(None))):
        return "cpu_engine is not what export writes (an engine and where it was measured)"
    return ""


def _unchanged(path: Path, info: dict[str, Any], names: tuple[str, ...]) -> bool:
    digests = info.get("sha256") or {}
    return all((path / name).exists() == (name in digests) and
               (name not in digests or sha256_file(path / name) == digests[name]) for name in names)


def _finish_interrupted_change(model_dir: Path) -> None:
    """A `calibrate` killed while it replaced the model's files (calibration, reference, model.json) left a journal:
    its new files go into place now, as one, rather than leave a model whose sha256 no longer match."""
    try:
        if finish_replace(model_dir):
            get_logger().warning("interrupted_change_completed", model=str(model_dir),
                                 reason="a calibrate's change of the model's files was under way (its writer killed, "
                                        "or finishing beside this reader): its new calibration, reference and "
                                        "model.json are now in place")
    except OSError as exc:
        if exc.errno not in READ_ONLY:
            raise
        # A read-only reader beside a live calibrate: its renames are done within moments. A journal left with
        # nothing to do (its writer killed after the last rename) is no obstacle: the files are the new set.
        deadline = time.monotonic() + JOURNAL_WAIT_S
        while replace_pending(model_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if replace_pending(model_dir):
            raise InputError(f"{model_dir}: a calibrate was killed while it replaced the model's files "
                             f"({REPLACE_JOURNAL} is there) and they cannot be completed here ({exc.strerror}): "
                             "open the model once where it is writable (any command that reads it completes them)"
                             ) from None


def load_reference(model_dir: Path) -> dict[str, Any] | None:
    """The exported model's score reference (None when it has none: exported without a validation split)."""
    path = model_dir / REFERENCE_FILE
    if not path.exists():
        return None
    try:
        return check_reference(read_json(path), str(path))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def read_model_json(model_dir: Path) -> dict[str, Any]:
    """model.json, checked against the ONNX files it describes: a mismatch is an error (exit 2)."""
    meta_path = model_dir / "model.json"
    if not meta_path.exists():
        raise InputError(f"{model_dir}: not an exported model (no model.json)")
    for attempt in range(2):
        _finish_interrupted_change(model_dir)
        info = read_json(meta_path)
        actual = model_digest(model_dir)
        expected = info.get("sha256")
        # A calibrate that replaced the files while they were hashed: read them again, once, as they are now.
        if actual == expected or attempt or not (model_dir / REPLACE_JOURNAL).exists() and read_json(meta_path) == info:
            break
    if actual != expected:
        if not isinstance(expected, dict):
            raise InputError(f"{model_dir}: model.json has no sha256 of its model files; re-export the model")
        differ = sorted(name for name in {*expected, *actual} if expected.get(name) != actual.get(name))
        raise InputError(f"{model_dir}: {', '.join(differ)} not as model.json's sha256 records (changed, missing "
                         "or added since export); re-export the model")
    # The tokenizer decides the scores too (exports before it was recorded are not checked).
    for name, digest in info.get("tokenizer_sha256", {}).items():
        if not (model_dir / name).is_file():
            raise InputError(f"{model_dir}: tokenizer file {name} is missing; copy the whole model directory")
        if sha256_file(model_dir / name) != digest:
            raise InputError(f"{model_dir}: tokenizer file {name} does not match its sha256 in model.json")
    if list(info.get("dimensions", [])) != list(DIMENSIONS):
        raise InputError(f"{model_dir}: model.json dimensions {info.get('dimensions')} are not {list(DIMENSIONS)}")
    return info
