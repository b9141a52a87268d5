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

from ..core.atomic import write_dir_atomic
from ..core.errors import InputError
from ..core.spec import DIMENSIONS, NUM_DIMENSIONS
from ..datasets.readers import label_matrix
from ..modeling.loading import EMBEDDINGS_FILE, HEAD_FILE
from ..modeling.predict import PaddedBatch, predict
from ..modeling.prompts import PromptTooLong, build_prompt, format_target, target_ids
from ..modeling.tokens import pad_batch, to_device
from .config import TrainConfig
from .data import SplitData, check_batch_fits, read_split


def reasonings(table: Any, path: Path) -> list[str]:
    """The split's `reasoning` column, every row's present (what the targets are made of; `--dry-run` checks it)."""
    if "reasoning" not in table.column_names:
        raise InputError(f"{path}: --mode instruction needs a 'reasoning' column (the oracle's explanation, "
                         "which 'data synth' writes)")
    values = table.column("reasoning").to_pylist()
    for i, reasoning in enumerate(values):
        if not (reasoning or "").strip():
            raise InputError(f"{path} row {i}: reasoning is null or empty")
    return values


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
            labels = label_matrix(table)
            targets = [format_target(reasoning, labels[i].tolist())
                       for i, reasoning in enumerate(reasonings(table, path))]
            loaded.append((path, table, labels, targets))
        # Every article gets the same room (max_length - the longest target), so the prompts scored later are the
        # prompts trained on; scoring builds them with prompt_max_length = max_length - target_reserve.
        self.target_reserve, longest = max((len(target_ids(self.tokenizer, t)), f"{path} row {i}")
                                           for path, _, _, targets in loaded for i, t in enumerate(targets))
        splits = []
        self.truncated: dict[str, np.ndarray] = {}  # per split, whether each prompt cut its article (the dry run's)
        for path, table, labels, targets in loaded:
            tokens, prompt_lengths, cut = [], [], []
            rows = zip(table.column("title").to_pylist(), table.column("content").to_pylist(), targets)
            for i, (title, content, target) in enumerate(rows):
                try:
                    parts = build_prompt(self.tokenizer, title, content, self.config.max_length, target,
                                         self.target_reserve)
                except PromptTooLong as exc:  # the reserve is the longest target's: that row is the cause
                    raise InputError(f"{longest} (the longest reasoning, whose room every prompt keeps): {exc}; "
                                     "shorten it or raise --max-length") from None
                tokens.append(np.asarray(parts.input_ids, dtype=np.int64))
                prompt_lengths.append(len(parts.prompt_ids))
                cut.append(parts.article_truncated)
            self.truncated[path.stem] = np.asarray(cut, dtype=bool)
            splits.append(SplitData(table, labels, tokens, np.asarray(prompt_lengths),
                                    self.config.max_length - self.target_reserve))
        check_batch_fits(data_dir, splits[0].table.num_rows, self.config.batch_size)
        return splits[0], splits[1]

    def build_model(self, base: Any, dtype: Any, label_mean: np.ndarray) -> Any:
        import torch

        from ..modeling.networks import InstructionModel, causal_lm

        lm, config = causal_lm(base, dtype, train_embeddings=self.config.train_embeddings)
        model = InstructionModel(lm, config.hidden_size)
        with torch.no_grad():
            model.head.bias.copy_(torch.as_tensor(label_mean, dtype=torch.float32))
        return model

    @staticmethod
    def is_head(name: str) -> bool:
        return name.startswith("head.")

    def _batch(self, data: SplitData, idx: np.ndarray, device: Any) -> tuple[Any, Any, Any, Any, int]:
        """ids, mask, targets, each prompt's last position, and the first position any row learns from."""
        rows = [data.tokens[i] for i in idx]
        ids, mask = pad_batch(rows, self.pad_id)
        targets = np.where(mask == 1, ids, -100)
        prompt = data.prompt_lengths[idx]
        targets[np.arange(ids.shape[1])[None, :] < prompt[:, None]] = -100  # the prompt is read, not learned
        return (to_device(ids, device), to_device(mask, device), to_device(targets, device),
                to_device(prompt - 1, device), max(int(prompt.min()) - 1, 0))

    def _losses(self, model: Any, data: SplitData, idx: np.ndarray, device: Any, autocast_dtype: Any) -> tuple[Any, Any]:
        import torch

        ids, mask, targets, prompt_end, first = self._batch(data, idx, device)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            # Logits from the shortest prompt's last position on: every target before it is -100.
            logits, preds = model(ids, mask, prompt_end, first)
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[:, first + 1:],
                                                       ignore_index=-100)
        return token_loss, preds.float()

    def loss_and_preds(self, forward: Any, data: SplitData, idx: np.ndarray, labels: Any, device: Any,
                       autocast_dtype: Any) -> tuple[Any, Any, Any]:
        import torch

        token_loss, preds = self._losses(forward, data, idx, device, autocast_dtype)
        loss = token_loss + self.config.score_loss_weight * torch.nn.functional.mse_loss(preds, labels)
        return loss, preds, token_loss

    def validate(self, model: Any, data: SplitData, device: Any, autocast_dtype: Any) -> tuple[np.ndarray, dict[str, float]]:
        """The head's predictions through the shared inference path, and the token loss over the same batches."""
        import torch

        model.eval()
        token_losses: list[float] = []

        def run(batch: PaddedBatch) -> Any:
            with torch.inference_mode():
                token_loss, preds = self._losses(model, data, batch.rows, device, autocast_dtype)
            token_losses.append(float(token_loss) * len(batch.rows))
            return preds

        preds = predict(run, data.tokens, self.pad_id, batch_size=self.config.batch_size * 2)
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
                "dimensions": list(DIMENSIONS), "num_labels": NUM_DIMENSIONS, "head_in_adapter": False,
                "head_file": HEAD_FILE, "embeddings_file": EMBEDDINGS_FILE if embeddings.requires_grad else None,
                "pooling": "hidden state of the prompt's last token",
                "hidden_size": model.head.in_features}, indent=2))

        write_dir_atomic(dest, fill)
