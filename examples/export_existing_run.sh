#!/usr/bin/env bash
# Export-only: re-export the student of a finished run (manifest.json present) to other formats / precisions.
# Every artifact is parity-checked against eager PyTorch; a failed gate exits 1 with the numbers.
set -euo pipefail
RUN_DIR=${1:-runs/demo}
singer-deploy export "$RUN_DIR" --formats onnx openvino --precision int8   # NNCF + ONNX Runtime Q/DQ, calibrated
singer-deploy export "$RUN_DIR" --formats onnx --precision fp16             # FP16 cast graph, LayerNorm/Softmax FP32
# On a GPU machine with TensorRT 10/11 installed:  singer-deploy export "$RUN_DIR" --formats trt --precision fp16
# Any timm ViT as it is (no distillation), from a local weights file, with config overrides:
#   singer-deploy export vit_small_patch14_dinov2 --weights /weights/vit_s14.safetensors --images /data/val \
#       --formats onnx openvino student.kwargs.img_size=224 export.golden_size=16 export.polygraphy_goldens=true
