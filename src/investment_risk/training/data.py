"""Training data: the split's train and val tables, their labels and token ids (cached per run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.spec import DIMENSIONS
from ..datasets.readers import label_matrix, read_articles
from ..datasets.split import check_split_file
from ..modeling.tokens import article_texts, encode, encode_cached
from .config import TrainConfig


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
    check_split_file(path)
    return read_articles([path], labels=DIMENSIONS)


def load_article_splits(config: TrainConfig, tokenizer: Any, cache: Path | None) -> tuple[SplitData, SplitData]:
    data_dir = Path(config.data)
    splits = []
    for name in ("train", "val"):
        table = read_split(data_dir, name)
        texts = article_texts(table)
        if cache is not None:
            tokens = encode_cached(tokenizer, texts, config.max_length, cache / f"tokens-{name}.safetensors",
                                   config.truncation)
        else:
            tokens = encode(tokenizer, texts, config.max_length, truncation=config.truncation)
        splits.append(SplitData(table, label_matrix(table), tokens))
    check_batch_fits(data_dir, splits[0].table.num_rows, config.batch_size)
    return splits[0], splits[1]


def check_batch_fits(data_dir: Path, train_rows: int, batch_size: int) -> None:
    if train_rows < batch_size:
        raise InputError(f"{data_dir / 'train.parquet'}: {train_rows} rows are too few for one batch of "
                         f"--batch-size {batch_size}")
