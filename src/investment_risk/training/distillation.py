"""Distillation, the production mode: article -> base model -> 8-output regression head, MSE loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_dir_atomic
from ..core.spec import DIMENSIONS, NUM_DIMENSIONS
from ..modeling.predict import TorchRunner, predict
from ..modeling.tokens import pad_batch, to_device
from .config import TrainConfig
from .data import SplitData, load_article_splits


class DistillationTask:
    """Article -> base model -> 8-output regression head; MSE. The production mode."""

    mode = "distillation"

    def __init__(self, config: TrainConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def prepare(self, cache: Path | None) -> tuple[SplitData, SplitData]:
        return load_article_splits(self.config, self.tokenizer, cache)

    def build_model(self, base: Any, dtype: Any, label_mean: np.ndarray) -> Any:
        from ..modeling.networks import regression_model

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
        model.eval()
        runner = TorchRunner(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, device, autocast_dtype)
        return predict(runner, data.tokens, self.pad_id, batch_size=self.config.batch_size * 2), {}

    def save(self, model: Any, dest: Path) -> None:
        save_model(model, self.tokenizer, dest)


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
        (work / "regression_head.json").write_text(json.dumps({"dimensions": list(DIMENSIONS), "num_labels": NUM_DIMENSIONS,
                                                              "head_in_adapter": True}, indent=2))

    write_dir_atomic(dest, fill)
