"""The fp16 or bf16 graph of a decoder (Qwen2, Llama, Mistral) for ONNX Runtime's CUDA provider, written by
onnxruntime-genai's model builder, with the run's score head appended.

    merged PyTorch model -> causal-LM checkpoint (safetensors) -> builder (fp16|bf16, cuda, no LM head) ->
    graph surgery: no KV cache, the head on each row's last real token, the last block pooled there ->
    model.onnx (input_ids, attention_mask -> scores)

Why the builder and not the dynamo export for this: its graph has one packed QKV MatMul and a GroupQueryAttention
per layer (rotary inside, flash attention on the GPU, no repeated K/V, no (batch, 1, S, S) mask), where the dynamo
graph after onnxscript's fusions keeps the rotary and the K/V repeat as a dozen element-wise kernels per layer and
a full attention bias. On a GPU, those memory-bound passes are what stands between eager PyTorch and the matmul
peak.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.errors import ConfigError, RetryableError
from .pooling import pool_graph

# The builder writes a graph for the CausalLM class of these architectures.
CAUSAL_LM_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
BUILDER_MODULE = "onnxruntime_genai.models.builder"
BUILDER_TIMEOUT_S = 3600


class BuilderError(RetryableError):
    """onnxruntime-genai's model builder failed or wrote a graph we cannot use."""


def builds_decoder_graph(model_type: str, dtype: str) -> bool:
    """Whether an export of this architecture in this dtype goes through the model builder."""
    return dtype in ("fp16", "bf16") and model_type in CAUSAL_LM_CLASSES


def builder_missing() -> str:
    """Why the model builder cannot run here ('' when it can)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return ("the GPU graph of a decoder is written by onnxruntime-genai's model builder, which is not installed "
                "(the `cpu` extra has onnxruntime-genai; the image has onnxruntime-genai-cuda)")
    return ""


def decoder_head_problem(classifier: Any, tokenizer: Any) -> str:
    """Why the classifier's head cannot be appended to the builder's graph ('' when it can): checked before the
    minutes of work that precede the builder."""
    if getattr(classifier.score, "bias", None) is not None:
        return "the score head has a bias; the graph surgery appends a bias-free head"
    if tokenizer.pad_token_id is None:
        return "the tokenizer has no pad token: the head pools at each row's last non-pad token"
    return ""


def builder_version() -> str:
    for name in ("onnxruntime-genai-cuda", "onnxruntime-genai"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "onnxruntime-genai (version unknown)"


def save_causal_checkpoint(classifier: Any, tokenizer: Any, target: Path) -> None:
    """The classifier's transformer as the causal-LM checkpoint the builder reads: its config (tied embeddings: the
    LM head is never built), its `model.*` weights in safetensors, and the tokenizer."""
    from safetensors.torch import save_file

    config = classifier.config.to_dict()
    config["architectures"] = [CAUSAL_LM_CLASSES[config["model_type"]]]
    config["tie_word_embeddings"] = True
    for key in ("id2label", "label2id", "problem_type"):
        config.pop(key, None)
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config))
    weights = {f"model.{name}": tensor.detach().cpu().contiguous()
               for name, tensor in classifier.model.state_dict().items()}
    save_file(weights, str(target / "model.safetensors"))
    tokenizer.save_pretrained(target)


def run_builder(checkpoint: Path, out: Path, cache: Path, precision: str) -> None:
    """The builder in a process of its own: its memory (a second copy of the weights) goes back when it ends."""
    command = [sys.executable, "-m", BUILDER_MODULE, "-i", str(checkpoint), "-o", str(out), "-p", precision,
               "-e", "cuda", "-c", str(cache), "--extra_options", "exclude_lm_head=true", "hf_token=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:  # 17 s for 1.5B parameters on 2 cores: an hour means it hangs
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuilderError(f"onnxruntime-genai's model builder did not finish in {BUILDER_TIMEOUT_S} s") from None
    if done.returncode != 0 or not (out / "model.onnx").exists():
        tail = "\n".join(done.stdout.strip().splitlines()[-5:])
        raise BuilderError(f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n{tail}")


def attach_score_head(built: Path, target: Path, score_weight: np.ndarray, pad_id: int, external: bool) -> bool:
    """The builder's graph made a scorer: the KV-cache inputs go (an empty past is what GroupQueryAttention assumes
    without them), the cache outputs go, and the head is applied to the final hidden state at each row's last
    non-pad token, as the PyTorch classifier pools (so right padding, any length); then the last block is pooled
    there too (`pooling`), which it returns whether it was. Input and output types match the dynamo graph's: int64
    ids and mask in, fp32 scores out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(built / "model.onnx"), load_external_data=False)
    graph = model.graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    if {i.name for i in graph.input} - past != {"input_ids", "attention_mask"} or \
            [o.name for o in graph.output if not o.name.startswith("present.")] != ["hidden_states"]:
        raise ConfigError(f"the model builder's graph has inputs {[i.name for i in graph.input]} and outputs "
                          f"{[o.name for o in graph.output]}; expected input_ids, attention_mask, the KV cache and "
                          "hidden_states")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in past:
                node.input[i] = ""
    inputs = [i for i in graph.input if i.name not in past]
    del graph.input[:], graph.output[:]
    graph.input.extend(inputs)
    head = "/score_head"
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(score_weight.T, dtype=np.float32), f"{head}/weight"),
        numpy_helper.from_array(np.array(pad_id, np.int64), f"{head}/pad_id"),
        numpy_helper.from_array(np.array(0, np.int64), f"{head}/zero"),
        numpy_helper.from_array(np.array(1, np.int64), f"{head}/one"),
    ])
    graph.node.extend([  # last non-pad position: argmax over position * (token != pad), as transformers does
        helper.make_node("Equal", ["input_ids", f"{head}/pad_id"], [f"{head}/is_pad"]),
        helper.make_node("Not", [f"{head}/is_pad"], [f"{head}/is_token"]),
        helper.make_node("Cast", [f"{head}/is_token"], [f"{head}/is_token_int"], to=TensorProto.INT64),
        helper.make_node("Shape", ["input_ids"], [f"{head}/length_1d"], start=1, end=2),
        helper.make_node("Squeeze", [f"{head}/length_1d"], [f"{head}/length"]),
        helper.make_node("Range", [f"{head}/zero", f"{head}/length", f"{head}/one"], [f"{head}/positions"]),
        helper.make_node("Mul", [f"{head}/is_token_int", f"{head}/positions"], [f"{head}/token_positions"]),
        # in float: the CUDA provider has no int64 ArgMax, and a CPU one would copy the ids off the GPU mid-run
        helper.make_node("Cast", [f"{head}/token_positions"], [f"{head}/token_positions_f"], to=TensorProto.FLOAT),
        helper.make_node("ArgMax", [f"{head}/token_positions_f"], [f"{head}/last"], axis=-1, keepdims=1),
        helper.make_node("GatherND", ["hidden_states", f"{head}/last"], [f"{head}/last_hidden"], batch_dims=1),
        helper.make_node("Cast", [f"{head}/last_hidden"], [f"{head}/last_hidden_fp32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", [f"{head}/last_hidden_fp32", f"{head}/weight"], ["scores"]),
    ])
    graph.output.extend([helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                                       ["batch_size", score_weight.shape[0]])])
    pooled = pool_graph(graph)
    if external:  # the graph alone is rewritten; the builder's weights file moves over under the name it records
        locations = {entry.value for tensor in graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        if locations != {"model.onnx.data"}:
            raise ConfigError(f"the model builder wrote its weights to {sorted(locations)}, not model.onnx.data")
        onnx.save_model(model, str(target / "model.onnx"))
        shutil.move(str(built / "model.onnx.data"), str(target / "model.onnx.data"))
    else:
        onnx.load_external_data_for_model(model, str(built))
        onnx.save_model(model, str(target / "model.onnx"))
    return pooled


@dataclass(frozen=True)
class DecoderCheckpoint:
    """A merged decoder classifier on disk, as the builder reads it, and the head the graph gets appended."""

    path: Path
    score_weight: np.ndarray  # (8, hidden)
    pad_id: int


@contextmanager
def decoder_checkpoint(classifier: Any, tokenizer: Any, work: Path) -> Iterator[DecoderCheckpoint]:
    """The classifier's weights on disk (fp32, as they are) for the builder, under `work` until the block ends: once
    it is written, PyTorch's copy may go before the builder loads its own."""
    if problem := decoder_head_problem(classifier, tokenizer):
        raise ConfigError(problem)
    scratch = work / ".decoder-build"
    try:
        save_causal_checkpoint(classifier, tokenizer, scratch / "checkpoint")
        yield DecoderCheckpoint(scratch / "checkpoint", classifier.score.weight.detach().float().cpu().numpy(),
                                int(tokenizer.pad_token_id))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_decoder_graph(checkpoint: DecoderCheckpoint, work: Path, external: bool, precision: str = "fp16"
                        ) -> dict[str, Any]:
    """model.onnx (and model.onnx.data when `external`) in `work`, from the checkpoint, in `precision` (fp16 or
    bf16: weights and activations; the head runs in fp32); returns how it was made. Without the builder installed
    its process fails, and the error carries its last lines (export_run says so before any work)."""
    started = time.perf_counter()
    built = checkpoint.path.parent / "onnx"
    run_builder(checkpoint.path, built, checkpoint.path.parent / "cache", precision)
    pooled = attach_score_head(built, work, checkpoint.score_weight, checkpoint.pad_id, external)
    shutil.rmtree(built)
    return {"route": "onnxruntime-genai model builder (GroupQueryAttention, packed QKV) + score head",
            "builder": builder_version(), "precision": precision, "execution_provider": "cuda",
            "pooled_last_block": pooled,
            "seconds": round(time.perf_counter() - started, 1)}
