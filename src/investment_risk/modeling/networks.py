"""The trainable networks: a base model with LoRA on every attention and MLP projection, and either an
8-output regression head (distillation) or a causal LM with a score head beside it (instruction)."""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError
from ..core.spec import NUM_DIMENSIONS
from .presets import BaseModel, check_causal, load_config, quiet_libraries

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
HEAD_MODULES = {"bert": ["classifier", "pooler"], "roberta": ["classifier"]}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05


def lora_config(model_type: str, task: str = "SEQ_CLS") -> Any:
    from peft import LoraConfig, TaskType

    if model_type not in LORA_TARGETS:
        raise ConfigError(f"no LoRA target set for architecture {model_type!r}; supported: {', '.join(LORA_TARGETS)}")
    return LoraConfig(
        task_type=TaskType[task], r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
        target_modules=LORA_TARGETS[model_type], modules_to_save=HEAD_MODULES.get(model_type),
    )


def regression_model(base: BaseModel, tokenizer: Any, dtype: Any = None, meta: bool = False) -> Any:
    """Base model + 8-output regression head + LoRA on every attention and MLP projection (the last block pooled at
    the head's position, `pooled_block`)."""
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
    from .pooled_block import pool_last_block

    pool_last_block(peft_model)  # the last block at the head's position only: training and validation
    return peft_model


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) exactly as peft counts them."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(total), int(trainable)


def _torch() -> Any:
    import torch

    return torch


class InstructionModel(_torch().nn.Module):
    """The LoRA-wrapped causal LM and the score head on the hidden state at the prompt's last token."""

    def __init__(self, lm: Any, hidden_size: int) -> None:
        torch = _torch()
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(hidden_size, NUM_DIMENSIONS)

    def forward(self, input_ids: Any, attention_mask: Any, prompt_end: Any, logits_from: int = 0) -> tuple[Any, Any]:
        """(the LM's logits at positions `logits_from` onwards, the head's scores at `prompt_end`).

        The LM head is about 15 % of a 1.5B model's work per position and its fp32 logits the largest tensor of a
        step: the prompt's positions, which are read and not learned, are best not projected at all."""
        torch = _torch()
        # No KV cache: one pass (training or scoring) never reuses it; generation calls `self.lm` with one.
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                      logits_to_keep=input_ids.shape[1] - logits_from)
        pooled = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=input_ids.device), prompt_end]
        return out.logits, self.head(pooled.float())

    def score(self, input_ids: Any, attention_mask: Any) -> Any:
        """The head on a batch of prompts (right-padded, no target): one forward pass, no generation, and the LM
        head at one position (none would be all of them: `logits_to_keep=0`)."""
        _, scores = self(input_ids, attention_mask, attention_mask.sum(dim=1) - 1, input_ids.shape[1] - 1)
        return scores

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = self.lm.get_nb_trainable_parameters()
        head = sum(p.numel() for p in self.head.parameters())
        return trainable + head, total + head


def causal_lm(base: Any, dtype: Any = None, meta: bool = False, train_embeddings: bool = False) -> Any:
    """The base as a causal LM with LoRA on every attention and MLP projection (and trainable embeddings if asked)."""
    torch = _torch()
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=False)
    except (ValueError, KeyError) as exc:  # an unknown architecture, or one that would need remote code
        raise ConfigError(f"base model {base.name!r} at {base.path}: {str(exc).splitlines()[0]}") from None
    check_causal(base, config.model_type)
    if meta:
        with torch.device("meta"):
            lm = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(config.model_type, "CAUSAL_LM"))
            lm.get_input_embeddings().weight.requires_grad_(train_embeddings)
            return lm, config
    lm = AutoModelForCausalLM.from_pretrained(base.path, use_safetensors=True, trust_remote_code=False,
                                              dtype=dtype or torch.float32)
    lm = get_peft_model(lm, lora_config(config.model_type, "CAUSAL_LM"))
    # A never-pretrained base has random embeddings that LoRA cannot route around; with tied weights this also
    # trains the LM head. The weights are saved beside the adapter (EMBEDDINGS_FILE).
    lm.get_input_embeddings().weight.requires_grad_(train_embeddings)
    for param in lm.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return lm, config
