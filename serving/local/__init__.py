"""The CPU development server: the real Triton from nvidia-pytriton with an onnxruntime shim."""
