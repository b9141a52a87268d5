"""Instruction mode: a causal LM with LoRA writes reasoning + JSON scores; a small head reads the scores directly.

Loss = token cross-entropy on the target only (prompt and padding masked) + lambda * MSE of a linear head on the
hidden state at the end of the prompt. Because attention is causal, that hidden state does not depend on the
target, so at scoring time the head needs only the prompt: one forward pass, no generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .batching import pad_batch, sorted_batches, to_device
from .dataio import write_dir_atomic
from .errors import ConfigError, InputError
from .instruct import PromptTooLong, build_prompt, format_target, target_ids
from .spec import DIMENSIONS
from .train import SplitData, TrainConfig, label_matrix, read_split

CAUSAL_TYPES = ("qwen2", "llama", "mistral")
HEAD_FILE = "regression_head.safetensors"
EMBEDDINGS_FILE = "token_embeddings.safetensors"


def _torch() -> Any:
    import torch

    return torch


class InstructionModel(_torch().nn.Module):
    """The LoRA-wrapped causal LM and the score head on the hidden state at the prompt's last token."""

    def __init__(self, lm: Any, hidden_size: int) -> None:
        torch = _torch()
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(hidden_size, len(DIMENSIONS))

    def forward(self, input_ids: Any, attention_mask: Any, prompt_end: Any) -> tuple[Any, Any]:
        torch = _torch()
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pooled = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=input_ids.device), prompt_end]
        return out.logits, self.head(pooled.float())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = self.lm.get_nb_trainable_parameters()
        head = sum(p.numel() for p in self.head.parameters())
        return trainable + head, total + head


def causal_lm(base: Any, dtype: Any = None, meta: bool = False, train_embeddings: bool = False) -> Any:
    """The base as a causal LM with LoRA on every attention and MLP projection (and trainable embeddings if asked)."""
    torch = _torch()
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import lora_config, quiet_libraries

    quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=False)
    except (ValueError, KeyError) as exc:  # an unknown architecture, or one that would need remote code
        raise ConfigError(f"base model {base.name!r} at {base.path}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in CAUSAL_TYPES:
        raise ConfigError(f"--mode instruction needs a causal language model ({', '.join(CAUSAL_TYPES)}); "
                          f"{base.name} is {config.model_type!r}")
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


class InstructionTask:
    mode = "instruction"

    def __init__(self, config: TrainConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def prepare(self, cache: Path | None) -> tuple[SplitData, SplitData]:
        data_dir = Path(self.config.data)
        loaded = []
        for name in ("train", "val"):
            table = read_split(data_dir, name)
            path = data_dir / f"{name}.parquet"
            if "reasoning" not in table.column_names:
                raise InputError(f"{path}: --mode instruction needs a 'reasoning' column (the oracle's explanation, "
                                 "which 'data synth' writes)")
            labels = label_matrix(table)
            targets = []
            for i, reasoning in enumerate(table.column("reasoning").to_pylist()):
                if not (reasoning or "").strip():
                    raise InputError(f"{path} row {i}: reasoning is null or empty")
                targets.append(format_target(reasoning, labels[i].tolist()))
            loaded.append((path, table, labels, targets))
        # Every article gets the same room (max_length - the longest target), so the prompts scored later are the
        # prompts trained on; scoring builds them with prompt_max_length = max_length - target_reserve.
        self.target_reserve = max(len(target_ids(self.tokenizer, t)) for *_, targets in loaded for t in targets)
        splits = []
        for path, table, labels, targets in loaded:
            tokens, prompt_lengths = [], []
            rows = zip(table.column("title").to_pylist(), table.column("content").to_pylist(), targets)
            for i, (title, content, target) in enumerate(rows):
                try:
                    parts = build_prompt(self.tokenizer, title, content, self.config.max_length, target,
                                         self.target_reserve)
                except PromptTooLong as exc:
                    raise InputError(f"{path} row {i}: {exc}") from None
                tokens.append(np.asarray(parts.input_ids, dtype=np.int64))
                prompt_lengths.append(len(parts.prompt_ids))
            splits.append(SplitData(table, labels, tokens, np.asarray(prompt_lengths),
                                    self.config.max_length - self.target_reserve))
        if splits[0].table.num_rows < self.config.batch_size:
            raise InputError(f"{data_dir / 'train.parquet'}: {splits[0].table.num_rows} rows are too few for one batch "
                             f"of --batch-size {self.config.batch_size}")
        return splits[0], splits[1]

    def build_model(self, base: Any, dtype: Any, label_mean: np.ndarray) -> Any:
        torch = _torch()
        lm, config = causal_lm(base, dtype, train_embeddings=self.config.train_embeddings)
        model = InstructionModel(lm, config.hidden_size)
        with torch.no_grad():
            model.head.bias.copy_(torch.as_tensor(label_mean, dtype=torch.float32))
        return model

    @staticmethod
    def is_head(name: str) -> bool:
        return name.startswith("head.")

    def _batch(self, data: SplitData, idx: np.ndarray, device: Any) -> tuple[Any, Any, Any, Any]:
        rows = [data.tokens[i] for i in idx]
        ids, mask = pad_batch(rows, self.pad_id)
        targets = np.where(mask == 1, ids, -100)
        prompt = data.prompt_lengths[idx]
        targets[np.arange(ids.shape[1])[None, :] < prompt[:, None]] = -100  # the prompt is read, not learned
        return (to_device(ids, device), to_device(mask, device), to_device(targets, device),
                to_device(prompt - 1, device))

    def _losses(self, model: Any, data: SplitData, idx: np.ndarray, device: Any, autocast_dtype: Any) -> tuple[Any, Any]:
        torch = _torch()
        ids, mask, targets, prompt_end = self._batch(data, idx, device)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, preds = model(ids, mask, prompt_end)
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[:, 1:],
                                                       ignore_index=-100)
        return token_loss, preds.float()

    def loss_and_preds(self, forward: Any, data: SplitData, idx: np.ndarray, labels: Any, device: Any,
                       autocast_dtype: Any) -> tuple[Any, Any, Any]:
        torch = _torch()
        token_loss, preds = self._losses(forward, data, idx, device, autocast_dtype)
        loss = token_loss + self.config.score_loss_weight * torch.nn.functional.mse_loss(preds, labels)
        return loss, preds, token_loss

    def validate(self, model: Any, data: SplitData, device: Any, autocast_dtype: Any) -> tuple[np.ndarray, dict[str, float]]:
        torch = _torch()
        model.eval()
        preds = np.zeros((len(data.tokens), len(DIMENSIONS)), dtype=np.float32)
        token_losses = []
        with torch.inference_mode():
            for idx in sorted_batches(np.array([len(t) for t in data.tokens]), self.config.batch_size * 2):
                token_loss, batch_preds = self._losses(model, data, idx, device, autocast_dtype)
                preds[idx] = batch_preds.cpu().numpy()
                token_losses.append(float(token_loss) * len(idx))
        return preds, {"token_loss": sum(token_losses) / max(len(data.tokens), 1)}

    def save(self, model: Any, dest: Path) -> None:
        """Adapter, head and tokenizer, swapped into place whole."""
        from safetensors.torch import save_file

        def fill(work: Path) -> None:
            model.lm.save_pretrained(work, safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(work / HEAD_FILE))
            embeddings = model.lm.get_input_embeddings().weight
            if embeddings.requires_grad:
                save_file({"weight": embeddings.detach().cpu().contiguous()}, str(work / EMBEDDINGS_FILE))
            self.tokenizer.save_pretrained(work)
            (work / "regression_head.json").write_text(json.dumps({
                "dimensions": list(DIMENSIONS), "num_labels": len(DIMENSIONS), "head_in_adapter": False,
                "head_file": HEAD_FILE, "embeddings_file": EMBEDDINGS_FILE if embeddings.requires_grad else None,
                "pooling": "hidden state of the prompt's last token",
                "hidden_size": model.head.in_features}, indent=2))

        write_dir_atomic(dest, fill)


def load_instruction_run(run_dir: Path, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """A trained instruction run: InstructionModel (adapter + head loaded), tokenizer, metadata."""
    torch = _torch()
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import load_tokenizer, quiet_libraries, resolve_base_model

    if not (run_dir / "model" / "adapter_model.safetensors").exists():
        raise InputError(f"{run_dir}: not a training run (needs model/adapter_model.safetensors; pickle files are "
                         "never loaded)")
    metadata = json.loads((run_dir / "training_metadata.json").read_text())
    quiet_libraries()
    base = resolve_base_model(metadata["model_name"])
    tokenizer = load_tokenizer(run_dir / "model")
    lm = AutoModelForCausalLM.from_pretrained(base.path, use_safetensors=True, trust_remote_code=False,
                                              dtype=dtype or torch.float32)
    lm = PeftModel.from_pretrained(lm, run_dir / "model", is_trainable=False)
    if (run_dir / "model" / EMBEDDINGS_FILE).exists():
        with torch.no_grad():
            lm.get_input_embeddings().weight.copy_(load_file(str(run_dir / "model" / EMBEDDINGS_FILE))["weight"])
    model = InstructionModel(lm, AutoConfig.from_pretrained(base.path).hidden_size)
    model.head.load_state_dict(load_file(str(run_dir / "model" / HEAD_FILE)))
    return model.eval(), tokenizer, metadata


def prompt_budget(metadata: dict[str, Any]) -> int:
    """The tokens a run's prompts may take when scored: what training left them (instruction), else max_length."""
    return int(metadata.get("prompt_max_length") or metadata["max_length"])


def prompt_tokens(tokenizer: Any, titles: list[str | None], contents: list[str | None], max_length: int) -> list[np.ndarray]:
    """Prompt-only token ids (instruction + article, no target): what the score head and generation read."""
    return [np.asarray(build_prompt(tokenizer, t, c, max_length).prompt_ids, dtype=np.int64)
            for t, c in zip(titles, contents)]


def head_scores(model: Any, rows: list[np.ndarray], pad_id: int, batch_size: int, device: Any) -> np.ndarray:
    """The score head on prompts, in input order."""
    torch = _torch()
    out = np.zeros((len(rows), len(DIMENSIONS)), dtype=np.float32)
    with torch.inference_mode():
        for idx in sorted_batches(np.array([len(r) for r in rows]), batch_size):
            ids, mask = pad_batch([rows[i] for i in idx], pad_id)
            prompt_end = mask.sum(axis=1) - 1
            _, preds = model(to_device(ids, device), to_device(mask, device), to_device(prompt_end, device))
            out[idx] = preds.float().cpu().numpy()
    return out


def generate_explanations(model: Any, tokenizer: Any, rows: list[np.ndarray], device: Any,
                          max_new_tokens: int = 512, constrained: bool = True) -> list[str]:
    """Greedy reasoning + JSON for each prompt, one at a time (no left-padding subtleties).

    Constrained (the default) is grammar-guided greedy decoding: at each step the most likely token that keeps the
    text a valid prefix of ANSWER_PATTERN wins, and the paragraph is closed in time to leave room for the JSON. The
    model still chooses every word and number; the grammar only rules out malformed output. Free decoding is plain
    greedy generation, for measuring how well the model learned the format by itself.
    """
    torch = _torch()
    texts = []
    decoder = _ConstrainedDecoder(tokenizer, max_new_tokens) if constrained else None
    with torch.inference_mode():
        for row in rows:
            ids = torch.as_tensor(row, device=device)[None, :]
            if decoder is not None:
                texts.append(decoder.generate(model.lm, ids))
                continue
            out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


class _ConstrainedDecoder:
    """Greedy decoding under the answer grammar, with a KV cache."""

    CANDIDATES = 64  # top tokens tried before scanning the whole vocabulary

    def __init__(self, tokenizer: Any, max_new_tokens: int) -> None:
        from .instruct import answer_grammar, format_target

        self.tokenizer = tokenizer
        self.grammar = answer_grammar()
        # Each token's text as it reads after other text: decoded behind an anchor, because SentencePiece
        # tokenizers drop a token's leading space when it is decoded alone.
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
        offset = len(tokenizer.decode(anchor))
        self.pieces = [tokenizer.decode(anchor + [i])[offset:] for i in range(len(tokenizer))]
        self.special = set(tokenizer.all_special_ids)
        # Room for the longest JSON even if the grammar makes the model spell it one character per token.
        json_chars = len(format_target("", [10.0] * len(DIMENSIONS)))
        self.paragraph_budget = max(max_new_tokens - json_chars, 0)
        self.max_new_tokens = max_new_tokens

    def _allowed(self, text: str, piece: str, token: int, close_paragraph: bool) -> bool:
        if token in self.special or not piece:
            return False
        if close_paragraph and "\n" not in text and "\n" not in piece:
            return False
        return self.grammar.fullmatch(text + piece, partial=True) is not None

    def _pick(self, logits: Any, text: str, close_paragraph: bool) -> int | None:
        # The embedding matrix may be padded past the tokenizer's vocabulary: those ids are never candidates.
        order = logits[: len(self.pieces)].argsort(descending=True).tolist()
        for token in order[: self.CANDIDATES] + order[self.CANDIDATES:]:
            if self._allowed(text, self.pieces[token], token, close_paragraph):
                return token
        return None

    def generate(self, lm: Any, ids: Any) -> str:
        import inspect

        from transformers import DynamicCache

        # The cache argument was renamed (past_key_values -> cache) in transformers 5.2x; the cache fills in place.
        forward = inspect.signature(type(lm.get_base_model()).forward).parameters
        cache = {"cache" if "cache" in forward else "past_key_values": DynamicCache()}
        text, step_ids, generated = "", ids, []
        for step in range(self.max_new_tokens):
            out = lm(input_ids=step_ids, use_cache=True, **cache)
            token = self._pick(out.logits[0, -1].float(), text, step >= self.paragraph_budget)
            if token is None:
                break
            generated.append(token)
            text += self.pieces[token]
            if self.grammar.fullmatch(text) is not None:
                break
            step_ids = ids.new_tensor([[token]])
        # The pieces steer the grammar; the answer is the ids decoded together (multi-byte characters intact).
        return self.tokenizer.decode(generated, skip_special_tokens=True)
