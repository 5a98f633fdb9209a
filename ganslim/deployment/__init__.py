"""Out of PyTorch: checkpoints (``checkpoint``: safetensors + the architecture, ``archspec``), ONNX and
int8 ONNX for onnxruntime (``deploy``, ``onnx_rewrite``), quantization-aware training (``quantization``)."""
