"""Before/after reports: size, MACs, latency (PyTorch and ONNX Runtime), accuracy; Rich, JSON and Markdown."""
