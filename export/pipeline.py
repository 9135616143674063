"""export_student: one call from a trained student to checked artifacts.

    student -> ONNX (FP32, the one graph every backend starts from)
            -> per format: ONNX Runtime file, OpenVINO FP32 + FP16 IR, TensorRT engine, Torch-TensorRT program
            -> parity of each artifact against eager PyTorch on the caller's real images, gated per precision
            -> a golden bundle per artifact and an export manifest (JSON)

An OpenVINO artifact is an IR and the inference precision hint it runs at (`runner_options`): parity gates it at
that hint, its golden bundle records it for `verify`, and the manifest says so; "openvino/bf16" is the FP32 IR at
the bf16 hint (docs/export.md, "OpenVINO").

Reduced-precision ONNX / TensorRT / OpenVINO-INT8 artifacts come from the `converters` the caller passes, keyed
by (format, precision); the pipeline layer passes singer_deploy.calibration's. Export itself knows no converter:
asking for a precision nobody converts to is a ConfigError before any work.

The result keeps every runner it opened for parity (and the eager reference), so a benchmark of the same run reuses
them instead of opening each artifact again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np
from torch import nn

from singer_deploy.config import (CPU_FORMATS, FORMAT_PRECISIONS, ParityPolicy, check_precision, format_name,
                                  normalize_precision)
from singer_deploy.devices import cpu_copy
from singer_deploy.errors import ConfigError, DataError, ParityError
from singer_deploy.export.golden import REFERENCE_DIR, open_runner, runner_device, write_golden, write_reference
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.export.onnx import DEFAULT_OPSET, export_onnx
from singer_deploy.export.parity import ParityReport, compare_outputs
from singer_deploy.export.polygraphy_goldens import command_line, polygraphy_command, write_polygraphy_reference
from singer_deploy.export.runner import Runner, TorchRunner, validate_batch
from singer_deploy.export.runtimes import import_onnxruntime
from singer_deploy.export.student import ExportableStudent
from singer_deploy.io import atomic_write_json

if TYPE_CHECKING:
    from singer_deploy.config import TensorRTBuildConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "export_manifest.json"
DEFAULT_GOLDEN_SIZE = 32   # images in the shared golden reference set (parity itself uses every parity image)
# OpenVINO precision -> the INFERENCE_PRECISION_HINT its artifact is gated, timed and shipped with. f32 pins what the
# IR stores (the CPU plugin's own default would run bf16 on CPUs with native BF16); precision "auto" passes "f16" for
# the FP16 IR on CPUs that compute FP16 natively.
OPENVINO_HINTS: dict[str, str] = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}

# fn(fp32_artifact, out_path, calib_images or None) -> the path written. "onnx" converters also feed TensorRT.
Converter = Callable[[Path, Path, "np.ndarray | None"], Path]
Converters = Mapping[tuple[str, str], Converter]


@dataclass
class ArtifactRecord:
    key: str                 # "<format>/<precision>", e.g. "openvino/fp16"
    format: str
    precision: str
    path: Path
    exporter: str            # what produced the file (e.g. "torch.onnx dynamo", "openvino.convert_model(onnx)")
    seconds: float           # export / build time
    parity: ParityReport | None = None
    golden_dir: Path | None = None
    runner_options: dict = field(default_factory=dict)   # how to open it: parity, goldens, verify and bench use them
    runner_info: dict = field(default_factory=dict)
    runner: Runner | None = field(default=None, repr=False, compare=False)   # opened for parity, kept for reuse

    def to_dict(self) -> dict:
        return {"key": self.key, "format": self.format, "precision": self.precision, "path": str(self.path),
                "exporter": self.exporter, "seconds": self.seconds, "runner_options": dict(self.runner_options),
                "runner": self.runner_info,
                "golden_dir": None if self.golden_dir is None else str(self.golden_dir),
                "parity": None if self.parity is None else self.parity.to_dict()}


@dataclass
class ExportResult:
    out_dir: Path
    artifacts: dict[str, ArtifactRecord]
    manifest_path: Path | None = None
    reference: TorchRunner | None = field(default=None, repr=False, compare=False)   # the eager PyTorch runner
    # The artifact each format ships when several candidates were built (precision "auto"); None: all of them.
    shipped: dict[str, str] | None = None
    # What the manifest also records: host capabilities, target, calibration set, precision decision ...
    notes: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every shipped artifact passes its gate (a rejected candidate's failure is recorded, not fatal)."""
        keys = self.artifacts if self.shipped is None else self.shipped.values()
        return all(self.artifacts[k].parity is not None and self.artifacts[k].parity.passed for k in keys)

    @property
    def paths(self) -> dict[str, Path]:
        return {k: a.path for k, a in self.artifacts.items()}

    @property
    def reports(self) -> dict[str, ParityReport]:
        return {k: a.parity for k, a in self.artifacts.items() if a.parity is not None}

    @property
    def runners(self) -> dict[str, Runner]:
        """The loaded runner of every artifact, as parity used it (same options a benchmark wants)."""
        return {k: a.runner for k, a in self.artifacts.items() if a.runner is not None}

    def parity_rows(self) -> list[dict]:
        """Every artifact's ParityReport.table_rows(), unchanged: one row per artifact and output."""
        return [row for a in self.artifacts.values() if a.parity is not None for row in a.parity.table_rows()]

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "passed": self.passed, "shipped": self.shipped, **self.notes,
                "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()}}

    def write_manifest(self) -> Path:
        self.manifest_path = self.out_dir / MANIFEST_NAME
        atomic_write_json(self.manifest_path, self.to_dict())  # strict JSON: a NaN metric becomes "NaN"
        return self.manifest_path

    def raise_if_failed(self) -> "ExportResult":
        shipped = self.artifacts if self.shipped is None else set(self.shipped.values())
        failed = {k: r for k, r in self.reports.items() if not r.passed and k in shipped}
        if failed:
            raise ParityError(f"{len(failed)} exported artifact(s) fail parity: {', '.join(failed)}",
                              report=self.to_dict(), expected="every artifact within its precision's gate",
                              found="; ".join(f"{k}: {', '.join(r.failures())}" for k, r in failed.items()),
                              fix="see the per-artifact parity tables in the export manifest")
        return self


def _img_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def _converter_table(converters: Converters | None) -> dict[tuple[str, str], Converter]:
    """The caller's converters under canonical (format, precision) names ("ov", "INT8" -> "openvino", "int8")."""
    return {(format_name(fmt), normalize_precision(prec)): fn
            for (fmt, prec), fn in (converters or {}).items()}


def _converter(converters: dict[tuple[str, str], Converter], fmt: str, precision: str) -> Converter:
    if (fmt, precision) not in converters:
        raise ConfigError(f"No converter produces {precision} {fmt} artifacts here",
                          expected=f"export_student(converters={{('{fmt}', '{precision}'): fn, ...}}), e.g. "
                                   "singer_deploy.calibration.converters.export_converters()",
                          found=f"converters for: {', '.join('/'.join(k) for k in sorted(converters)) or 'none'}",
                          fix="use precision='fp32' (OpenVINO also writes an FP16 IR), or pass the converters "
                              "(distill_and_export and `singer-deploy export` pass calibration's)")
    return converters[(fmt, precision)]


def _precisions(precision: str | Sequence[str]) -> tuple[str, ...]:
    """One precision, or several to build side by side (the candidates of precision "auto")."""
    wanted = [precision] if isinstance(precision, str) else list(precision)
    if not wanted:
        raise ConfigError("No export precision given", expected="fp32, fp16, bf16 or int8 (or several)",
                          found="an empty list", fix="pass precision='fp32'")
    return tuple(dict.fromkeys(normalize_precision(p) for p in wanted))


def _plan(formats: Sequence[str], precisions: tuple[str, ...],
          converters: dict[tuple[str, str], Converter]) -> list[str]:
    """Resolve names and fail on impossible requests before anything is exported."""
    names = list(dict.fromkeys(format_name(f) for f in formats))
    if not names:
        raise ConfigError("No export format given", expected="at least one of onnx, openvino, tensorrt",
                          found="an empty list", fix="pass formats=('onnx', 'openvino')")
    gpu_only = [n for n in names if n not in CPU_FORMATS]
    if len(precisions) > 1 and gpu_only:
        raise ConfigError("Several precisions are built side by side for CPU formats only",
                          expected="one precision with " + ", ".join(gpu_only), found=", ".join(precisions),
                          fix="export the GPU formats in a separate call with one precision")
    for precision in precisions:
        # Several precisions (auto's candidates): each format builds those it carries, e.g. bf16 only for OpenVINO.
        carried = [n for n in names if len(precisions) == 1 or precision in FORMAT_PRECISIONS[n]]
        if not carried:
            raise ConfigError(f"No requested format carries {precision}", expected=f"a format whose precisions "
                              f"include {precision}", found=", ".join(names), fix=f"drop {precision}")
        _plan_one(carried, precision, converters)
    return names


def _plan_one(names: list[str], precision: str, converters: dict[tuple[str, str], Converter]) -> None:
    for name in names:
        check_precision(name, precision)
        if name == "onnx":
            import_onnxruntime()  # parity runs the artifact: fail before exporting when no ORT build is installed
        if name in ("tensorrt", "torch_tensorrt"):
            # Fails with BackendUnavailableError("... not available here ...") on CPU-only machines.
            if name == "tensorrt":
                from singer_deploy.export.tensorrt import import_tensorrt

                import_tensorrt()
            else:
                from singer_deploy.export.torch_tensorrt import import_torch_tensorrt

                import_torch_tensorrt()
        needs_converter = (name in ("onnx", "tensorrt") and precision != "fp32") or \
                          (name == "openvino" and precision == "int8")
        if needs_converter:
            _converter(converters, "openvino" if name == "openvino" else "onnx", precision)


def export_student(student: nn.Module, out_dir: str | Path, formats: Sequence[str] = ("onnx", "openvino"), *,
                   img_size: int | Sequence[int], projector: nn.Module | None = None,
                   precision: str | Sequence[str] = "fp32",
                   calib_images: np.ndarray | None = None, parity_images: np.ndarray,
                   policy: ParityPolicy | None = None, opset: int = DEFAULT_OPSET, stem: str = "student",
                   tensorrt_config: TensorRTBuildConfig | None = None, write_goldens: bool = True,
                   converters: Converters | None = None, golden_size: int = DEFAULT_GOLDEN_SIZE,
                   polygraphy_goldens: bool = False, openvino_hints: Mapping[str, str] | None = None
                   ) -> ExportResult:
    """Export `student` (+ projector) to `formats`, check every artifact against eager PyTorch on
    `parity_images` (real, normalised images, float32 (B, C, H, W), B >= 11 for a full kNN@10 check), write a
    golden bundle per artifact and `export_manifest.json`. `policy` overrides the gate of artifacts whose precision
    is `precision`; other artifacts (e.g. the OpenVINO FP16 IR) use their precision's default gate.
    `converters` maps (format, precision) to the FP32 -> reduced-precision converter, needed for ONNX / TensorRT
    below FP32 and OpenVINO INT8 (e.g. singer_deploy.calibration.converters.export_converters()).
    The bundles share one reference set (`goldens/reference/`: the first `golden_size` parity images and their
    eager outputs), also written in Polygraphy's formats when `polygraphy_goldens` (export/polygraphy_goldens.py).
    Several precisions (CPU formats only) build every one side by side, e.g. the candidates of precision "auto".
    `openvino_hints` overrides OPENVINO_HINTS (precision -> inference precision hint of that OpenVINO artifact).
    Returns the result without raising on parity failure: call `.raise_if_failed()` to gate.
    """
    precisions = _precisions(precision)
    converters = _converter_table(converters)
    names = _plan(formats, precisions, converters)
    if isinstance(golden_size, bool) or not isinstance(golden_size, int) or golden_size < 1:
        raise ConfigError("golden_size must be a positive integer", expected="an int >= 1 (default "
                          f"{DEFAULT_GOLDEN_SIZE})", found=repr(golden_size), fix="e.g. golden_size=32")
    wrapper = student if isinstance(student, ExportableStudent) else ExportableStudent(student, projector)
    # Device rule (singer_deploy.devices): exporters, the eager reference and the goldens work on an fp32 CPU copy,
    # wherever the caller's student lives (e.g. still on the training GPU); the caller's module is not touched.
    wrapper = cpu_copy(wrapper)
    hw = _img_hw(img_size)
    if wrapper.img_size != hw:
        raise ConfigError("img_size does not match the student", expected=f"{wrapper.img_size} (the student's)",
                          found=str(hw), fix="create the student at the resolution you deploy, or pass its size")
    reference = TorchRunner(wrapper).load()
    parity_images = validate_batch(parity_images, reference.input_chw, "export_student(parity_images)")
    if len(parity_images) < 2:
        raise DataError("Parity needs several images", expected="B >= 2 (>= 11 for kNN@10)",
                        found=f"B = {len(parity_images)}", fix="pass a batch of real, normalised images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_outputs = reference.run(parity_images)

    records = _export_all(wrapper, out_dir, names, precisions, stem, opset, calib_images, tensorrt_config,
                          converters, {**OPENVINO_HINTS, **(openvino_hints or {})})
    goldens = None
    if write_goldens:
        with stage(f"goldens: shared reference set of {min(golden_size, len(parity_images))} images"
                   f"{' (+ Polygraphy format)' if polygraphy_goldens else ''}"):
            goldens = _GoldenSet.write(out_dir / "goldens", parity_images, ref_outputs, golden_size, wrapper,
                                       polygraphy_goldens)
    for record in records:
        # Default runner options are the parity settings (ORT: TensorRT > CUDA > CPU provider); an OpenVINO
        # record runs at its own hint.
        log.info("parity: %s on %d images", record.key, len(parity_images))
        runner = open_runner(record.path, **record.runner_options).load()
        gate = policy if (policy is not None and record.precision in precisions) else \
            ParityPolicy.for_precision(record.precision)
        record.parity = compare_outputs(ref_outputs, runner.run(parity_images), record.precision, gate,
                                        candidate_name=record.key)
        record.runner_info, record.runner = dict(runner.info), runner
        if goldens is not None:
            record.golden_dir = goldens.bundle(record, gate, wrapper, runner_device(runner))
    result = ExportResult(out_dir, {r.key: r for r in records}, reference=reference,
                          notes={"host": host_capabilities().to_dict()})
    result.write_manifest()
    return result


@dataclass
class _GoldenSet:
    """The reference set every artifact's bundle points at (written once per export)."""

    root: Path
    arrays: Path
    outputs: dict[str, np.ndarray]
    polygraphy: bool

    @classmethod
    def write(cls, root: Path, images: np.ndarray, outputs: dict[str, np.ndarray], size: int, model: nn.Module,
              polygraphy: bool) -> "_GoldenSet":
        images, outputs = images[:size], {k: v[:size] for k, v in outputs.items()}
        arrays = write_reference(root / REFERENCE_DIR, inputs=images, reference_outputs=outputs, model=model)
        if polygraphy:
            write_polygraphy_reference(root / REFERENCE_DIR, images, outputs)
        return cls(root, arrays, outputs, polygraphy)

    def bundle(self, record: ArtifactRecord, gate: ParityPolicy, model: nn.Module, device: str) -> Path:
        extra = {"artifact_key": record.key, "exporter": record.exporter, "runner_options": record.runner_options}
        command = polygraphy_command(record.path, self.root / REFERENCE_DIR, gate, self.outputs) \
            if self.polygraphy else None
        if command is not None:
            extra["polygraphy_command"] = command_line(command)
        return write_golden(self.root / record.key.replace("/", "-"), reference=self.arrays, policy=gate,
                            artifact_path=record.path, model=model, device=device, extra=extra)


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """A log line when an export / quantize / build stage starts and one with its time when it ends: these steps
    take minutes on real models, and the CLI shows singer_deploy's INFO log."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def _export_all(wrapper: ExportableStudent, out_dir: Path, names: list[str], precisions: tuple[str, ...],
                stem: str, opset: int, calib_images: np.ndarray | None,
                tensorrt_config: TensorRTBuildConfig | None, converters: dict[tuple[str, str], Converter],
                openvino_hints: Mapping[str, str]) -> list[ArtifactRecord]:
    records: list[ArtifactRecord] = []
    precision = precisions[0]   # the GPU formats' one precision (_plan allows several for CPU formats only)
    onnx_fp32 = None
    if {"onnx", "openvino", "tensorrt"} & set(names):
        with stage(f"export: ONNX fp32 (torch.onnx, opset {opset}) -> {out_dir / f'{stem}.onnx'}"):
            exported = export_onnx(wrapper, out_dir / f"{stem}.onnx", opset=opset)
        onnx_fp32 = ArtifactRecord("onnx/fp32", "onnx", "fp32", exported.path, f"torch.onnx {exported.exporter}",
                                   exported.seconds)
    onnx_records = {"fp32": onnx_fp32}
    if onnx_fp32 is not None and {"onnx", "tensorrt"} & set(names):
        for reduced in (p for p in precisions if p != "fp32" and p in FORMAT_PRECISIONS["onnx"]):
            start = time.perf_counter()
            convert = converters[("onnx", reduced)]
            with stage(f"{'quantize' if reduced == 'int8' else 'convert'}: ONNX {reduced} "
                       f"({_converter_name(convert)}) -> {out_dir / f'{stem}_{reduced}.onnx'}"):
                path = convert(onnx_fp32.path, out_dir / f"{stem}_{reduced}.onnx", calib_images)
            onnx_records[reduced] = ArtifactRecord(f"onnx/{reduced}", "onnx", reduced, Path(path),
                                                   _converter_name(convert), time.perf_counter() - start)
    if "onnx" in names:
        records += [onnx_records[p] for p in precisions if p in onnx_records]
    if "openvino" in names:
        records += _export_openvino(onnx_fp32, out_dir, stem, precisions, calib_images, converters, openvino_hints)
    if "tensorrt" in names:
        from singer_deploy.export.tensorrt import build_engine

        onnx_target = onnx_records[precision]   # converted above: TensorRT builds from the ONNX file of its precision
        with stage(f"build: TensorRT {precision} engine from {onnx_target.path.name}"):
            built = build_engine(onnx_target.path, out_dir / f"{stem}_{precision}.engine", precision=precision,
                                 config=tensorrt_config)
        records.append(ArtifactRecord(f"tensorrt/{precision}", "tensorrt", precision, built.engine_path,
                                      f"tensorrt {built.tensorrt_version} (from {onnx_target.path.name})",
                                      built.seconds))
    if "torch_tensorrt" in names:
        from singer_deploy.export.torch_tensorrt import compile_torch_tensorrt

        with stage(f"build: Torch-TensorRT {precision} program"):
            compiled = compile_torch_tensorrt(wrapper, out_dir / f"{stem}_{precision}.ep", precision=precision)
        records.append(ArtifactRecord(f"torch_tensorrt/{precision}", "torch_tensorrt", precision, compiled.path,
                                      f"torch_tensorrt {compiled.version}", compiled.seconds))
    return records


def _converter_name(convert: Converter) -> str:
    """What produced a converted artifact, for the record's `exporter`: the converter's import path."""
    name = getattr(convert, "__qualname__", type(convert).__qualname__)
    return f"{getattr(convert, '__module__', type(convert).__module__)}.{name}"


def _export_openvino(onnx_fp32: ArtifactRecord, out_dir: Path, stem: str, precisions: tuple[str, ...],
                     calib_images: np.ndarray | None, converters: dict[tuple[str, str], Converter],
                     hints: Mapping[str, str]) -> list[ArtifactRecord]:
    """The FP32 + FP16 IR pair, the FP32 IR at the bf16 hint when bf16 is asked for, and the INT8 IR when INT8 is."""
    from singer_deploy.export.openvino import export_openvino

    with stage(f"export: OpenVINO IR fp32 + fp16 from {onnx_fp32.path.name}"):
        ir = export_openvino(onnx_fp32.path, out_dir, stem=stem)
    how = "openvino.convert_model(onnx) + save_model"
    records = [ArtifactRecord("openvino/fp32", "openvino", "fp32", ir.fp32_xml, f"{how}(compress_to_fp16=False)",
                              ir.seconds),
               ArtifactRecord("openvino/fp16", "openvino", "fp16", ir.fp16_xml, f"{how}(compress_to_fp16=True)",
                              ir.seconds)]
    if "bf16" in precisions:
        records.append(ArtifactRecord("openvino/bf16", "openvino", "bf16", ir.fp32_xml,
                                      f"{how}(compress_to_fp16=False)", ir.seconds))
    if "int8" in precisions:
        start = time.perf_counter()
        convert = converters[("openvino", "int8")]
        with stage(f"quantize: OpenVINO int8 ({_converter_name(convert)})"):
            path = convert(ir.fp32_xml, out_dir / f"{stem}_int8.xml", calib_images)
        records.append(ArtifactRecord("openvino/int8", "openvino", "int8", Path(path), _converter_name(convert),
                                      time.perf_counter() - start))
    for record in records:
        record.runner_options = {"inference_precision": hints[record.precision]}
    return records
