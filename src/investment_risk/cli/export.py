"""`export`: a distillation run as an ONNX model directory."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.logs import bind
from ..modeling.description import CPU_ENGINES
from . import output
from .options import option


@click.command("export")
@option("--run", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A training run directory.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
        help="fp16 (for GPUs): a decoder's graph comes from onnxruntime-genai's model builder (grouped-query "
             "attention); other models keep norms, softmax and other overflow-prone ops in fp32. bf16: a decoder's "
             "builder graph in bf16 (fp32's range), with --device cuda only. int8 (for CPUs) quantises the MatMuls "
             "dynamically. Each records its own parity.")
@option("--cpu-engine", type=click.Choice(["auto", *CPU_ENGINES]), default="auto",
        show_default=True, help="fp32: what scores the model on CPUs. auto measures each on the validation split and "
                                "keeps the fastest whose val MAE is within 0.02 of fp32's; a named one is "
                                "measured alone beside ONNX Runtime fp32.")
@option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
        help="Where reduced precision is proved: cuda runs the fp16 graph on ONNX Runtime's CUDA provider against "
             "PyTorch bf16 on the GPU, and scores the drift reference there.")
@option("--force", is_flag=True, help="Replace an existing --out.")
def export_command(run: Path, out: Path, dtype: str, cpu_engine: str, device: str, force: bool) -> None:
    """Merge the adapter and export to ONNX with a measured PyTorch parity (fp32 must be within 1e-3)."""
    from ..export.onnx_export import export_run

    bind(stage="export")
    info = export_run(run, out, dtype, force, cpu_engine, device)
    if output.on_terminal():  # the `exported` event carries the same on a piped stdout
        parity, dtype = info["parity"], info["dtype"]
        proved = (f"fp32 parity {parity['fp32_max_abs_diff']:.2e}" if "fp32_max_abs_diff" in parity  # the dynamo graph
                  else f"{dtype} parity {parity[f'{dtype}_max_abs_diff']:.2e} vs {parity[dtype]['reference']}")
        click.echo(f"{out}: model_version {info['model_version']}, {proved}, CPU engine {info['cpu_engine']['engine']}")
