"""Export: a distillation run merged and written as ONNX, with its parity measured."""
