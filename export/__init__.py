"""Export of distilled students: ONNX, OpenVINO, TensorRT; runners, parity, goldens, benchmarks."""
