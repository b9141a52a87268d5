"""The passes that turn one ONNX file into another, in place: the dynamo export itself, onnxscript's ONNX Runtime
fusions, fp16 and int8 conversion, and the counts model.json records of what they left behind."""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..modeling.description import onnx_files
from .pooling import pool_last_block, pooled_nodes

OPSET = 18  # at 23 torch writes the standard Attention op, which onnxscript's ORT fusions do not match
# Kept in fp32 in a reduced-precision graph: reductions and exponentials that overflow in fp16.
FP32_OPS = ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Softmax", "Exp", "Div",
            "RotaryEmbedding", "Cos", "Sin"]


def to_fp16(path: Path, external: bool, keep_fp32: Sequence[str] = tuple(FP32_OPS)) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Given the path, the converter infers shapes file to file: a ModelProto over 2 GB cannot be serialised for it.
    converted = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=list(keep_fp32))
    merge_duplicate_casts(converted)
    for stale in onnx_files(path.parent):
        stale.unlink()
    onnx.save_model(converted, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data" if external else None)


def merge_duplicate_casts(model: Any) -> int:
    """Keep one of each set of identical nodes that write the same output; returns how many were dropped.

    onnxruntime(-gpu) 1.31's fp16 converter, the image's, inserts one fp16 -> fp32 Cast per consumer of a value kept
    in fp32, each with the same name and output, and ONNX Runtime refuses the graph ("two nodes with same node
    name"); 1.32 shares one Cast. Seen on an H100 with a Qwen2.5-1.5B-shaped export."""
    from onnx import NodeProto, ValueInfoProto

    seen: dict[tuple[str, ...], bytes] = {}
    kept: list[NodeProto] = []
    for node in model.graph.node:
        key, body = tuple(node.output), node.SerializeToString()
        if seen.get(key) != body:
            seen.setdefault(key, body)
            kept.append(NodeProto.FromString(body))
    dropped = len(model.graph.node) - len(kept)
    if dropped:
        infos: dict[str, bytes] = {}
        for info in model.graph.value_info:
            infos.setdefault(info.name, info.SerializeToString())
        del model.graph.node[:], model.graph.value_info[:]
        model.graph.node.extend(kept)
        model.graph.value_info.extend(ValueInfoProto.FromString(body) for body in infos.values())
    return dropped


def fused_operator_counts(path: Path) -> dict[str, int]:
    """Nodes of ONNX Runtime's contrib (com.microsoft) operators in the graph: what fusion left behind. An `If` runs
    one of its branches, so each operator counts as often as the branch holding more of it holds it."""
    import onnx

    return dict(sorted(_contrib_counts(onnx.load(str(path), load_external_data=False).graph).items()))


def _contrib_counts(graph: Any) -> Counter:
    counts: Counter = Counter()
    for node in graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] += 1
        branches = [_contrib_counts(a.g) for a in node.attribute if a.HasField("g")]
        for op in {op for branch in branches for op in branch}:
            counts[op] += max(branch[op] for branch in branches)
    return counts


def branch_on_padding(path: Path) -> int:
    """Each MultiHeadAttention given an attention bias becomes an `If` on whether the batch has padding at all:
    where it has none the bias (all zeros then) is left out, and ONNX Runtime's CPU kernel takes its flash-attention
    path, which it never takes with a mask. Only for a graph whose bias is the padding mask alone (an encoder's: a
    decoder's carries the causal mask too). Long news fills the token budget, so most scored batches have no
    padding: on minilm's int8 twin (64 x 128 tokens, 2 threads, AVX2 EPYC) attention took 424 ms a batch instead
    of 629, 7 % of the whole; on 2 AVX-512 VNNI cores unpadded batches ran 7 % / 14 % faster at 128 / 512 tokens.
    Returns how many nodes were branched; the graph is rewritten in place, its weights (when external) left where
    they are."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    nodes = [helper.make_node("ReduceMin", ["attention_mask"], ["batch_mask_min"], name="batch_mask_min", keepdims=0),
             helper.make_node("Cast", ["batch_mask_min"], ["batch_unpadded"], name="batch_unpadded",
                              to=TensorProto.BOOL)]
    branched = 0
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or len(node.input) < 6 or not node.input[5]:
            nodes.append(node)
            continue
        (out,) = node.output

        def branch(inputs: list[str], name: str) -> Any:
            inner = helper.make_node("MultiHeadAttention", inputs, [f"{out}_{name}"], name=f"{node.name}_{name}",
                                     domain=node.domain)
            inner.attribute.extend(node.attribute)
            return helper.make_graph([inner], f"{node.name}_{name}", [],
                                     [helper.make_tensor_value_info(f"{out}_{name}", TensorProto.FLOAT, None)])

        nodes.append(helper.make_node("If", ["batch_unpadded"], [out], name=f"{node.name}_on_padding",
                                      then_branch=branch(list(node.input[:4]), "unpadded"),
                                      else_branch=branch(list(node.input), "padded")))
        branched += 1
    if branched:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save_model(model, str(path))  # the graph only: the weights stay where its references say
    return branched


def fuse_graph(path: Path, external: bool, unpacked: Path | None = None, for_cpu: bool = True) -> dict[str, int]:
    """onnxscript's ORT fusions on the dynamo graph: SDPA -> MultiHeadAttention, LayerNorm, (Skip)RMSNorm, GELU, and
    last MultiHeadAttention with its Q, K, V projections -> Attention (one packed projection inside the attention
    kernel). Returns how many times each rewrite applied; an intermediate one (rotary_embedding, sdpa) is counted even
    where a later step folded it back or into another (fused_operator_counts says what the file holds).

    Packed attention is the faster fp32 graph on CPUs, but the quantiser leaves a projection inside Attention in
    fp32: given `unpacked` (a folder), the graph before packing is kept there for the int8 twin when packing
    applied (minilm at 128 tokens on an AVX2 EPYC, unpacked vs packed: int8 46.8 vs 44.8 rows/s, fp32 29.2 vs 31.4).

    A graph that may run on the CPU (`for_cpu`: any fp32 or int8 graph) keeps each residual Add apart from its
    LayerNormalization: ONNX Runtime 1.31's CPU SkipLayerNormalization took 9.1 ms where Add + LayerNormalization
    took 2.0 (64 x 128 x 384, 2 threads, AVX2 EPYC), and minilm's int8 twin ran 10 % faster without it. The CPU
    session keeps ONNX Runtime from fusing them back (onnx_runtime.session_options). SkipSimplifiedLayerNormalization
    (RMSNorm) is as fast as its parts there, so decoders keep it.

    Last, both graphs are pooled before their last block where the head reads one position (`pooling`)."""
    from unittest import mock

    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort
    from onnxscript.rewriter.ort_fusions.attention import fuse_attention

    # onnxscript's GroupQueryAttention and cos/sin-cache fusions are for decoders exported with a KV cache. On our
    # cacheless graph, as transformers 5.17 exports Qwen2, they still matched and fixed seqlens_k and position_ids
    # at a batch of one: ONNX Runtime then refused every larger batch (on an H100 and here, 2026-11-27). Without
    # them attention becomes MultiHeadAttention and the rotary stays plain operators, right for any batch (with
    # the lock's transformers 5.24 neither matched anyway). `_core` is where optimize_for_ort looks them up in the
    # locked onnxscript; if that moves, patching fails and so does every export test. Attention packing is held
    # back here and applied after, so that the graph before it can be kept.
    held_back = {"fuse_gqa": _no_fusion, "fuse_cos_sin_cache": _no_fusion, "fuse_attention": _no_fusion}
    if for_cpu:
        held_back["fuse_skip_layer_normalization"] = _no_fusion
    with mock.patch.multiple(_core, **held_back):
        model, counts = optimize_for_ort(ir.load(str(path)))
    if external:  # weights are read lazily from the files about to be replaced: bring them into memory first
        ir.external_data.load_to_model(model)
    for stale in onnx_files(path.parent):
        stale.unlink()
    if unpacked is not None:
        unpacked.mkdir()
        ir.save(model, str(unpacked / path.name), external_data="model.onnx.data" if external else None)
    counts["attention"] = fuse_attention(model)
    if unpacked is not None and not counts["attention"]:  # nothing packed: the graph kept is the graph
        for kept in onnx_files(unpacked):
            kept.rename(path.parent / kept.name)
        unpacked.rmdir()
    else:
        ir.save(model, str(path), external_data="model.onnx.data" if external else None)
    # Free the weights now: onnxscript's module-level rewrite rules keep the last graph they matched (this one),
    # and the graph's reference cycles wait for the next cyclic GC.
    for value in model.graph.initializers.values():
        value.const_value = None
    del model
    gc.collect()
    counts["pool_last_block"] = pool_last_block(path)
    if unpacked is not None and unpacked.exists():
        pool_last_block(unpacked / path.name)
    return {name: int(n) for name, n in counts.items() if n}


def _no_fusion(model: Any, **_: Any) -> int:
    return 0


def to_int8(path: Path, external: bool, source: Path | None = None, padding_mask_only: bool = False) -> None:
    """`path` replaced by its dynamic int8 graph (`--dtype int8`), quantised from `source` (the graph before
    attention was packed) or from `path` itself. The fp32 graph moves aside under its own names, because its weights
    file is found by the name the graph records."""
    aside = path.parent / "fp32"
    aside.mkdir()
    for stale in onnx_files(path.parent):
        stale.rename(aside / stale.name)
    quantize_dynamic_int8(source or aside / path.name, path, external, padding_mask_only)
    shutil.rmtree(aside)


# ONNX Runtime's quantiser peaked (maxrss) at 3.1x the fp32 weights of a graph of 100 MatMuls (7.0 GB for 2.3 GB) and
# at 4.2x for one 2.3 GB matrix; a transformer's many matrices sit near the first, so with a margin export asks 3.5x,
# about 22 GB for a Qwen2.5-1.5B graph (6.2 GB).
DYNAMIC_INT8_MEMORY_PER_WEIGHT_BYTE = 3.5


def quantize_dynamic_int8(source: Path, out: Path, external: bool, padding_mask_only: bool = False) -> None:
    """Dynamic int8 quantisation of the MatMuls and Gemms (ONNX Runtime's quantiser) from `source` into `out`
    (its weights, when external, in `out`.data): for CPU scoring. Where attention is masked for padding alone
    (`padding_mask_only`: an encoder), it runs without the mask on batches without padding (`branch_on_padding`).

    Weights per output channel in 7 bits (`reduce_range`): without VNNI (AVX2, AVX-512F) ONNX Runtime's u8s8 kernels
    add pairs of u8 x s8 products in 16 bits, which saturate on full-range weights. On an AVX2-only EPYC the
    tiny-qwen2 export's parity was 0.67 per tensor in 8 bits, 0.83 per channel in 8 bits, 0.067 per tensor in 7
    bits and 0.015 per channel in 7 bits; a graph exported on one CPU may be scored on another."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    drop_initializer_shapes(source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser advises pre-processing on the root logger at every call
    scratch, previous = None, tempfile.tempdir
    try:
        # The quantiser saves a whole copy of the graph in a temporary folder: beside the output (the export's work
        # folder, on its volume), not in /tmp, which a pod keeps in memory (4Gi; a 1.5B graph is 6.2 GB).
        scratch = tempfile.mkdtemp(prefix=".quantise-", dir=out.parent)
        tempfile.tempdir = scratch
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=pooled_nodes(source),
                         per_channel=True, reduce_range=True, use_external_data_format=external,
                         # fused ops (SkipLayerNormalization) defeat shape inference; their outputs are fp32
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
        tempfile.tempdir = previous
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if padding_mask_only:
        branch_on_padding(out)


def drop_initializer_shapes(path: Path) -> None:
    """Remove the value_info entries of initializers (their tensors carry their shapes). onnxruntime 1.31's
    quantiser, the image's, turns each Gemm into a MatMul by transposing its weights in place; the old entry then
    contradicts the new shape and its shape inference fails ("Inferred shape and existing shape differ")."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {tensor.name for tensor in model.graph.initializer}
    kept = [onnx.ValueInfoProto.FromString(info.SerializeToString())
            for info in model.graph.value_info if info.name not in names]
    if len(kept) < len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        onnx.save_model(model, str(path))  # the graph only: the weights stay where its references say


def export_graph(module: Any, example: tuple[Any, ...], path: Path, external: bool) -> None:
    import torch

    # "torchvision is not installed. Skipping torchvision::nms" and three more, on stderr at every export (pods'
    # logs too): torchvision's operators are not ours to export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        module, example, str(path), input_names=["input_ids", "attention_mask"], output_names=["scores"],
        opset_version=OPSET, dynamo=True, external_data=external, verbose=False,
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
    )


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
