"""clada-export: CLADA activation-sparse LLMs exported to ONNX and TensorRT."""

__version__ = "0.1.0"
