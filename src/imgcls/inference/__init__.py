"""Inference: `imgcls predict`, the MLflow serving model, ONNX / TorchScript export."""
