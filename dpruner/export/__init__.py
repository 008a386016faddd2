"""Export to ONNX and verify the file in ONNX Runtime against PyTorch."""
