"""Export of distilled students: ONNX, OpenVINO, TensorRT; runners, parity, goldens, benchmarks."""

from singer_deploy.export.formats import FORMATS, ExportFormat, format_for_path, resolve_format
from singer_deploy.export.golden import load_golden, verify, write_golden
from singer_deploy.config import PRECISION_GATES, ParityPolicy
from singer_deploy.export.parity import ParityReport, compare_outputs
from singer_deploy.export.pipeline import Converter, ExportResult, export_student
from singer_deploy.export.runner import Runner, TorchRunner
from singer_deploy.export.student import INPUT_NAME, OUTPUT_NAMES, ExportableStudent

__all__ = [
    "FORMATS", "INPUT_NAME", "OUTPUT_NAMES", "PRECISION_GATES", "Converter", "ExportFormat", "ExportResult",
    "ExportableStudent", "ParityPolicy", "ParityReport", "Runner", "TorchRunner", "compare_outputs", "export_student",
    "format_for_path", "load_golden", "resolve_format", "verify", "write_golden",
]
