"""What the CPU an artifact runs on can do natively, and the named deployment targets.

INT8 and BF16/FP16 only pay off, and INT8 is only exact, on CPUs with the matching instructions:

- VNNI (AVX512-VNNI or AVX-VNNI) and AMX accumulate u8 x s8 products in 32 bits. Without them (AVX2, plain
  AVX-512) INT8 kernels use VPMADDUBSW, whose 16-bit intermediate sums saturate; quantizers compensate by using
  half the weight range (NNCF's overflow fix, ONNX Runtime's reduce_range; see calibration/int8_scheme.py), and
  INT8 is often not faster than FP32 there.
- BF16 compute needs AVX512-BF16 or AMX-BF16, FP16 compute AVX512-FP16 or AMX-FP16 (F16C only converts).

`host_capabilities()` reads the running CPU once per process from the OS (/proc/cpuinfo flags on Linux) and from
OpenVINO's own `OPTIMIZATION_CAPABILITIES` where OpenVINO is installed; `resolve_target(name)` turns an
`export.target` name into the capabilities of that target, so an artifact can be built on one machine for another.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from singer_deploy.config import CPU_TARGETS, HOST_TARGET, target_name
from singer_deploy.errors import BackendUnavailableError
from singer_deploy.export.openvino_core import openvino_core

HOST = HOST_TARGET


@dataclass(frozen=True)
class CpuCapabilities:
    """The instruction-set features that decide INT8 / BF16 / FP16 speed and exactness on x86-64 CPUs."""

    name: str                   # "host" or the named target
    avx2: bool
    avx512: bool                # AVX-512 foundation (avx512f)
    vnni: bool                  # AVX512-VNNI or AVX-VNNI: INT8 dot products without 16-bit saturation
    amx: bool                   # AMX-INT8 tiles
    bf16: bool                  # native BF16 compute (AVX512-BF16 or AMX-BF16)
    fp16: bool                  # native FP16 compute (AVX512-FP16 or AMX-FP16)
    source: str                 # where the flags came from
    cpu: str | None = None      # the CPU's name, for the host
    openvino: tuple[str, ...] | None = None   # OpenVINO CPU OPTIMIZATION_CAPABILITIES, for the host

    @property
    def int8_without_saturation(self) -> bool:
        """INT8 GEMMs accumulate in 32 bits (VNNI / AMX): the full 8-bit weight range is safe."""
        return self.vnni or self.amx

    @property
    def isa(self) -> str:
        """The best matching target name, e.g. "avx2" for an AVX2-only host."""
        return next(name for name, caps in reversed(TARGETS.items())
                    if all(getattr(self, f) >= getattr(caps, f) for f in _FEATURES)) if self.avx2 else "baseline"

    def native_precisions(self) -> tuple[str, ...]:
        """Precisions the target computes in with its own instructions (INT8 counts: every x86-64 target with
        AVX2 has INT8 kernels; whether they are faster is for a benchmark to say)."""
        return ("fp32",) + (("bf16",) if self.bf16 else ()) + (("fp16",) if self.fp16 else ()) + \
            (("int8",) if self.avx2 or self.int8_without_saturation else ())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["openvino"] = None if self.openvino is None else list(self.openvino)
        data["isa"] = self.isa
        data["int8_without_saturation"] = self.int8_without_saturation
        return data

    def summary(self) -> str:
        """One line for tables: "avx2 (AVX2; no VNNI/AMX/BF16/FP16) on AMD EPYC"."""
        have = [f.upper() for f in _FEATURES if getattr(self, f)]
        lack = [f.upper() for f in _FEATURES if not getattr(self, f)]
        where = f" on {self.cpu}" if self.cpu else ""
        return f"{self.isa} ({', '.join(have) or 'none'}; no {'/'.join(lack) or '-'}){where}"


_FEATURES = ("avx2", "avx512", "vnni", "amx", "bf16", "fp16")


def _target(name: str, *features: str) -> CpuCapabilities:
    return CpuCapabilities(name=name, source="named target", **{f: f in features for f in _FEATURES})


# The named targets of singer_deploy/config.py (export.target), ordered from least to most capable;
# CpuCapabilities.isa picks the last one a CPU covers.
TARGETS: dict[str, CpuCapabilities] = {name: _target(name, *features) for name, features in CPU_TARGETS.items()}

# /proc/cpuinfo flag -> feature (any listed flag sets it).
_CPU_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "amx": ("amx_int8",),
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
}


def capabilities_from_flags(flags: set[str], *, name: str = HOST, source: str = "flags", cpu: str | None = None,
                            openvino: tuple[str, ...] | None = None) -> CpuCapabilities:
    """Capabilities from a set of Linux cpuinfo flags; OpenVINO's BF16 / FP16 capabilities also count as native
    (OpenVINO only reports them where its CPU plugin has the kernels)."""
    features = {feature: any(flag in flags for flag in names) for feature, names in _CPU_FLAGS.items()}
    if openvino is not None:
        features["bf16"] = features["bf16"] or "BF16" in openvino
        features["fp16"] = features["fp16"] or "FP16" in openvino
    return CpuCapabilities(name=name, source=source, cpu=cpu, openvino=openvino, **features)


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[set[str], str | None] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
    return flags, model


def _openvino_capabilities() -> tuple[tuple[str, ...], str] | None:
    try:
        core = openvino_core()
    except BackendUnavailableError:
        return None
    try:
        return (tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                str(core.get_property("CPU", "FULL_DEVICE_NAME")))
    except Exception:  # noqa: BLE001 - a plugin that cannot answer leaves the OS flags as the only source
        return None


def _torch_capability_flags() -> set[str]:
    """Fallback where /proc/cpuinfo is missing (macOS, Windows): torch's own dispatch level (AVX2 / AVX512)."""
    import torch

    level = str(torch.backends.cpu.get_cpu_capability()).lower()
    return {"avx2"} | ({"avx512f"} if "avx512" in level else set())


@functools.lru_cache(maxsize=1)
def host_capabilities() -> CpuCapabilities:
    """The running CPU's capabilities, detected once per process."""
    openvino = _openvino_capabilities()
    ov_caps, ov_name = openvino if openvino else (None, None)
    cpuinfo = _read_cpuinfo()
    if cpuinfo is not None and cpuinfo[0]:
        flags, model = cpuinfo
        source = "/proc/cpuinfo" + (" + openvino" if ov_caps is not None else "")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        flags, model, source = _torch_capability_flags(), None, "torch cpu capability" + \
            (" + openvino" if ov_caps is not None else "")
    else:
        flags, model, source = set(), None, "none (not x86-64)" + (" + openvino" if ov_caps is not None else "")
    return capabilities_from_flags(flags, source=source, cpu=model or ov_name or platform.processor() or None,
                                   openvino=ov_caps)


def resolve_target(target: str | CpuCapabilities | None = None) -> CpuCapabilities:
    """`export.target` -> capabilities: None / "host" is this machine, a name from TARGETS a named CPU class."""
    if isinstance(target, CpuCapabilities):
        return target
    key = HOST if target is None else target_name(target)
    return host_capabilities() if key == HOST else TARGETS[key]


def target_is_host(target: CpuCapabilities) -> bool:
    """True when artifacts built for `target` can be benchmarked here: the host itself, or a named target whose
    features this host has exactly (same INT8 / BF16 / FP16 kernels chosen at run time)."""
    host = host_capabilities()
    return target.name == HOST or all(getattr(target, f) == getattr(host, f) for f in _FEATURES)
