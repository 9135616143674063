"""CPU capability detection and export targets: read from the OS and OpenVINO once, named targets validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from singer_deploy.config import TARGET_NAMES
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import (HOST, TARGETS, capabilities_from_flags, host_capabilities, resolve_target,
                                           target_is_host)

# Flag sets of real CPU families (subsets of their /proc/cpuinfo flags).
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
CASCADE_LAKE = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
ZEN4 = CASCADE_LAKE | {"avx512_bf16"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_int8", "amx_bf16", "avx512_fp16"}


@pytest.mark.parametrize("flags, isa, natives", [
    (ZEN3, "avx2", ("fp32", "int8")),
    (ALDER_LAKE, "avx_vnni", ("fp32", "int8")),
    (CASCADE_LAKE, "avx512_vnni", ("fp32", "int8")),
    (ZEN4, "avx512_bf16", ("fp32", "bf16", "int8")),
    (SAPPHIRE_RAPIDS, "amx_fp16", ("fp32", "bf16", "fp16", "int8")),
])
def test_flags_map_to_the_matching_target(flags, isa, natives):
    caps = capabilities_from_flags(flags)
    assert caps.isa == isa and caps.native_precisions() == natives
    assert caps.int8_without_saturation == (isa != "avx2")


def test_openvino_bf16_capability_counts_as_native():
    caps = capabilities_from_flags(ZEN3, openvino=("FP32", "BF16", "INT8"))
    assert caps.bf16 and not caps.fp16 and "bf16" in caps.native_precisions()


def test_every_named_target_is_its_own_isa():
    for name, caps in TARGETS.items():
        assert caps.isa == name and resolve_target(name) is caps and resolve_target(name.upper()) is caps


def test_host_is_detected_once_and_agrees_with_the_os_and_openvino():
    host = host_capabilities()
    assert host is host_capabilities() and resolve_target(None) is host and resolve_target(HOST) is host
    # The named target of the host's class is "the host" only when it has exactly the host's features: an
    # AVX512-BF16 Xeon that also has AVX512-FP16 (no AMX) is class avx512_bf16 but matches no named target exactly.
    named = TARGETS.get(host.isa)
    assert target_is_host(host) and (named is None or target_is_host(named) == all(
        getattr(named, f) == getattr(host, f) for f in ("avx2", "avx512", "vnni", "amx", "bf16", "fp16")))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert host.avx2 == ("avx2" in flags) and host.vnni == bool({"avx512_vnni", "avx_vnni"} & flags)
        assert host.amx == ("amx_int8" in flags)
    if host.openvino is not None:
        assert ("BF16" in host.openvino) <= host.bf16
    record = host.to_dict()
    assert record["isa"] == host.isa and record["source"] and host.summary().startswith(host.isa)


def test_unknown_target_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError, match="Unknown export target") as err:
        resolve_target("avx1024")
    assert all(name in str(err.value) for name in TARGET_NAMES)
