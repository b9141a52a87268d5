"""Loading what training made: a run's model (distillation or instruction), merged for scoring, and the runner
(ONNX Runtime or PyTorch) that scores a described model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.atomic import read_json
from ..core.errors import ConfigError, InputError, damaged
from .description import CPU_ENGINES, TWIN_FILES, ModelDescription
from .presets import BaseModel, load_config, load_tokenizer, quiet_libraries, resolve_base_model, revision_change

HEAD_FILE = "regression_head.safetensors"  # instruction runs: the score head beside the adapter
EMBEDDINGS_FILE = "token_embeddings.safetensors"  # instruction runs trained with --train-embeddings


def _run_metadata(run_dir: Path) -> dict[str, Any]:
    """A run's training_metadata.json, once the files that loading it reads are known to be there."""
    meta_path = run_dir / "training_metadata.json"
    if not meta_path.exists() or not (run_dir / "model" / "adapter_model.safetensors").exists():
        raise InputError(f"{run_dir}: not a training run (needs training_metadata.json and "
                         "model/adapter_model.safetensors; pickle files are never loaded)")
    metadata = read_json(meta_path)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("model_name"), str):
        raise InputError(f"{meta_path}: no model_name (the base model the run trained): the file is damaged")
    needed = ("adapter_config.json", "tokenizer.json", "tokenizer_config.json")
    if missing := [name for name in needed if not (run_dir / "model" / name).exists()]:
        raise InputError(f"{run_dir / 'model'}: {', '.join(missing)} missing: the run is incomplete or damaged")
    return metadata


def run_splits(run_dir: Path, metadata: dict[str, Any]) -> dict[str, Path | None]:
    """The run's train and val split files as it trained on them, or None for one gone or changed since: the file
    its --data names (a path relative to where training ran, in a run from before runs recorded it whole) must
    hold the sha256 the run recorded, or another split found under that name would stand in for it unnoticed."""
    from ..core.atomic import sha256_file
    from ..core.logs import get_logger

    data = metadata.get("config", {}).get("data")
    config = run_dir / "training_config.json"
    recorded = (read_json(config).get("data_sha256") or {}) if config.exists() else {}
    splits: dict[str, Path | None] = {}
    for name in ("train", "val"):
        path = Path(data) / f"{name}.parquet" if data else None
        if path is None or not path.is_file():
            splits[name] = None
        elif name in recorded and sha256_file(path) != recorded[name]:
            get_logger().warning("run_split_changed", split=name, path=str(path),
                                 reason="not the file the run trained on (another sha256): left out, as if gone")
            splits[name] = None
        else:
            splits[name] = path
    return splits


def run_split(metadata: dict[str, Any], name: str) -> Path | None:
    """The run's `name` split as export found it (`run_splits`, set once in its metadata as "splits")."""
    return metadata["splits"][name]


def run_base(run_dir: Path, metadata: dict[str, Any]) -> BaseModel:
    """The base model the run trained on. The adapter was fitted to those weights; on others (a local directory's
    weights replaced, a hub model staged again since) it scored without a word. A hub model's recorded snapshot is
    used while the cache still holds it."""
    base = resolve_base_model(metadata["model_name"])
    recorded = metadata.get("base_model_revision")
    if recorded is None or base.revision == recorded:
        return base
    snapshot = base.path.parent / str(recorded)  # the hub cache's snapshots/<commit>
    if base.path.parent.name == "snapshots" and (snapshot / "config.json").is_file():
        return BaseModel(base.name, snapshot, recorded)
    raise InputError(f"{run_dir}: trained on base model {metadata['model_name']!r} at revision {recorded}, now "
                     f"{base.revision} at {base.path}; its adapter was fitted to the other weights: "
                     f"{revision_change(base, str(recorded))}, or train again")


def load_run_model(run_dir: Path, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """A trained run's best model (base + adapter + head), its tokenizer and its metadata."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model_dir = run_dir / "model"
    metadata = _run_metadata(run_dir)
    quiet_libraries()
    base = run_base(run_dir, metadata)
    tokenizer = load_tokenizer(model_dir)
    config = load_config(base, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, config=config, use_safetensors=True, trust_remote_code=False, dtype=dtype or torch.float32,
    )
    model = load_adapter(model, model_dir)
    model.eval()
    return model, tokenizer, metadata


def load_adapter(model: Any, model_dir: Path) -> Any:
    """The run's adapter on `model`. A damaged one is the run's fault (exit 2), and one missing weights its config
    names is never loaded as a model without them: PEFT only warns, and an export's parity passes on it (PyTorch
    and the graph share the loss)."""
    import warnings

    from peft import PeftModel
    from safetensors import SafetensorError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # read onto the CPU, where the base is: a GPU's error (out of memory) is no damage of the run's
            model = PeftModel.from_pretrained(model, model_dir, is_trainable=False, torch_device="cpu")
        except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise damaged(model_dir, exc, "the adapter (adapter_config.json, adapter_model.safetensors) does not "
                          "load") from None
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise InputError(f"{model_dir / 'adapter_model.safetensors'}: weights its adapter config names are "
                             f"missing ({str(warning.message).splitlines()[0][:200]}): the run is damaged")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def load_instruction_run(run_dir: Path, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """A trained instruction run: InstructionModel (adapter + head loaded), tokenizer, metadata."""
    import torch

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .networks import InstructionModel  # torch at import: not on the ONNX scoring path

    metadata = _run_metadata(run_dir)
    quiet_libraries()
    base = run_base(run_dir, metadata)
    tokenizer = load_tokenizer(run_dir / "model")
    lm = AutoModelForCausalLM.from_pretrained(base.path, use_safetensors=True, trust_remote_code=False,
                                              dtype=dtype or torch.float32)
    lm = load_adapter(lm, run_dir / "model")
    if (run_dir / "model" / EMBEDDINGS_FILE).exists():
        with torch.no_grad():
            lm.get_input_embeddings().weight.copy_(load_file(str(run_dir / "model" / EMBEDDINGS_FILE))["weight"])
    model = InstructionModel(lm, AutoConfig.from_pretrained(base.path).hidden_size)
    try:
        model.head.load_state_dict(load_file(str(run_dir / "model" / HEAD_FILE)))
    except (RuntimeError, SafetensorError) as exc:  # another shape, missing keys, a file cut short
        raise damaged(run_dir / "model" / HEAD_FILE, exc, "does not fit the model") from None
    return model.eval(), tokenizer, metadata


def scoring_module(run_dir: Path, pooled: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """The run's model as a module (input_ids, attention_mask) -> scores (n, 8), the adapter merged in.

    An instruction run's module is its score head on the prompt's last token: one forward pass, no generation.
    `pooled`: a distillation model's last block computes at the head's position only (`pooled_block`); for
    scoring, not for export, whose graph pass pools the graph."""
    import torch

    metadata = _run_metadata(run_dir)
    if metadata.get("training_mode") == "instruction":
        model, tokenizer, metadata = load_instruction_run(run_dir)
        forward = model.score
        inner = model
    else:
        model, tokenizer, metadata = load_run_model(run_dir)
        inner = model.merge_and_unload()
        if pooled:
            from .pooled_block import pool_last_block

            pool_last_block(inner)

        def forward(input_ids: Any, attention_mask: Any) -> Any:
            return inner(input_ids=input_ids, attention_mask=attention_mask).logits

    class ScoringModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return forward(input_ids, attention_mask).float()

    return ScoringModule().eval(), tokenizer, metadata


def cpu_engine_usable(engine: str) -> tuple[bool, str]:
    """Whether `engine` can run on this machine, and if not, why."""
    if engine in ("onnxruntime", "onnxruntime-int8"):
        return True, ""
    if engine not in CPU_ENGINES:
        return False, f"unknown CPU engine {engine!r}; known: {', '.join(CPU_ENGINES)}"
    from .openvino_runtime import cpu_supports, openvino_available

    if not openvino_available():
        return False, "openvino is not installed"
    precision = engine.split("-", 1)[1]
    if precision != "int8" and not cpu_supports(precision):
        return False, f"this CPU has no native {precision} units"
    return True, ""


# The units the CPU engines' speeds turn on (AVX2 vs AVX-512, VNNI for int8, AVX-512 BF16 / AMX for bf16 and int8).
ENGINE_CPU_FEATURES = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_profile(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """This CPU as the CPU engines' speeds depend on it: its architecture and model, which of ENGINE_CPU_FEATURES
    it has, and the cores this process may use."""
    import platform

    from .onnx_runtime import usable_cpus

    model, flags = "unknown", set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags":  # the first CPU's; a machine's CPUs are alike
                flags = set(value.split())
                break
    except OSError:  # not Linux, or no /proc: the architecture alone says what it is
        pass
    return {"arch": platform.machine(), "model": model, "features": [f for f in ENGINE_CPU_FEATURES if f in flags],
            "cores": usable_cpus()}


def _warn_if_measured_elsewhere(model: ModelDescription, engine: str) -> None:
    """Export measured the engines on its own machine's CPU. On one with other units the ranking can turn
    (OpenVINO's static int8 ran 5.2x PyTorch fp32 at 128 tokens on a Xeon with VNNI and AMX, and slower than ONNX
    Runtime fp32 on an AVX2-only EPYC: README): say so, as the scorer cannot measure here without the validation
    split."""
    measured_on = model.cpu_engine_measured_on
    if not measured_on:
        return
    here = cpu_profile()
    if all(measured_on.get(key, here[key]) == here[key] for key in ("arch", "features")):
        return
    from ..core.logs import get_logger

    get_logger().warning("cpu_engine_measured_elsewhere", engine=engine, measured_on=measured_on, here=here,
                         reason="export chose the CPU engine on a CPU with other vector units; another engine may be "
                                "faster here: export on this kind of CPU, or name one with --cpu-engine")


def cpu_runner(model_path: Path, engine: str, threads: int | None = None, streams: int | None = None) -> Any:
    """A runner for an exported model.onnx on the CPU with the named engine, which may read a twin file beside it
    (OpenVINO: `streams`, None for its own choice)."""
    if engine in TWIN_FILES:
        model_path = model_path.with_name(TWIN_FILES[engine])
        if not model_path.exists():
            raise InputError(f"{model_path.parent}: no {model_path.name} for the {engine} engine (re-export the model)")
    if engine.startswith("onnxruntime"):
        from .onnx_runtime import OnnxRunner

        return OnnxRunner(model_path, "cpu", threads, label="int8" if engine in TWIN_FILES else "")
    from .openvino_runtime import OpenVinoRunner, cpu_supports

    precision = engine.split("-", 1)[1]
    if precision == "int8":
        return OpenVinoRunner(model_path, "bf16" if cpu_supports("bf16") else "f32", threads, "int8", streams)
    return OpenVinoRunner(model_path, precision, threads, streams=streams)


def gpu_visible() -> bool:
    """Whether a CUDA device can be used here (the driver and a GPU, not only CUDA libraries)."""
    import torch

    return torch.cuda.is_available()


def load_runner(model: ModelDescription, backend: str, device: str = "auto", threads: int | None = None,
                cpu_engine: str = "auto") -> Any:
    """The runner that scores `model`: its model.onnx (ONNX Runtime CUDA on a GPU; on CPUs the engine export chose,
    or `cpu_engine`), or PyTorch on its (source) run."""
    if backend == "onnx":
        if not model.exported and model.is_instruction:  # export refuses it: naming export would send them there
            raise ConfigError(f"{model.path}: an instruction run is scored with --backend torch (it has no ONNX "
                              "export)")
        if not model.exported:
            raise ConfigError(f"{model.path}: --backend onnx needs an exported model (run 'export'), "
                              "or pass --backend torch for a training run")
        import onnxruntime as ort

        from .onnx_runtime import OnnxRunner

        has_cuda_provider = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "cuda" or (device == "auto" and has_cuda_provider and gpu_visible()):
            # CUDA with I/O binding (exit 2 if asked for and absent)
            return OnnxRunner(model.path / "model.onnx", device, threads)
        if model.dtype == "bf16":
            raise ConfigError(f"{model.path}: a bf16 graph runs on ONNX Runtime's CUDA provider only (ONNX Runtime has "
                              "no bf16 CPU kernels); score it on a GPU, or export the run with --dtype fp32 for CPUs")
        if device == "auto" and has_cuda_provider:
            from ..core.logs import get_logger

            # onnxruntime-gpu on a node without a GPU (or its driver): the CPU engines score instead.
            get_logger().warning("cuda_unavailable", provider="CUDAExecutionProvider", used="CPU",
                                 reason="ONNX Runtime has its CUDA provider but no GPU is visible")
        engine = model.cpu_engine if cpu_engine == "auto" else cpu_engine
        if model.dtype != "fp32" and engine != "onnxruntime":
            raise ConfigError(f"--cpu-engine {engine}: {model.path} is a {model.dtype} graph, which runs on ONNX "
                              "Runtime (onnxruntime); the other engines read an fp32 export's file")
        usable, why = cpu_engine_usable(engine)
        if not usable:
            if cpu_engine != "auto":
                raise ConfigError(f"--cpu-engine {engine}: cannot run here ({why})")
            from ..core.logs import get_logger

            get_logger().warning("cpu_engine_fallback", wanted=engine, used="onnxruntime", reason=why)
            engine = "onnxruntime"
        elif cpu_engine == "auto":
            _warn_if_measured_elsewhere(model, engine)
        return cpu_runner(model.path / "model.onnx", engine, threads)
    if backend != "torch":
        raise ConfigError(f"--backend must be onnx or torch, not {backend!r}")
    import torch

    from .predict import TorchRunner, pick_device

    if not model.source_run.exists():
        raise InputError(f"{model.path}: --backend torch needs the source run {model.source_run}, which is gone")
    torch_device = pick_device(device)
    on_cuda = torch_device.type == "cuda"
    module, _, _ = scoring_module(model.source_run, pooled=True)
    module = (in_bf16(module, torch_device) if on_cuda else module.to(torch_device, dtype=torch.float32)).eval()
    if not on_cuda:
        from .onnx_runtime import usable_cpus

        torch.set_num_threads(threads or usable_cpus())
    return TorchRunner(module, torch_device, synchronous=True)


def in_bf16(module: Any, device: Any) -> Any:
    """`module` on `device` in bf16, its rotary frequencies (`inv_freq` buffers) kept in fp32: the model computes
    cos/sin from them in fp32, and rounded to bf16 with the rest they put a phase error of up to 0.59 rad on the
    angles at 512 tokens (the ONNX graphs keep fp32 frequencies, so their parity against PyTorch bf16 was off by it)."""
    import torch

    kept = {name: buffer.detach().clone() for name, buffer in module.named_buffers() if name.endswith("inv_freq")}
    module = module.to(device, dtype=torch.bfloat16)
    for name, buffer in kept.items():
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, buffer.to(device))  # a buffer still, as it was
    return module
