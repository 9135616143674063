"""Memory a run can still allocate, and the check that refuses a setting whose arrays cannot fit in it.

A setting such as `data.eval_n: 1000000000000` is a valid integer, but the run would generate and stack that many
images until the kernel's OOM killer ended it (no message, no documented exit code). The run's preflight
(singer_deploy/pipeline/preflight.py) adds up what its settings make it hold and calls `check_fits` before
allocating any of it (docs/reliability.md, "Memory").
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from singer_deploy.errors import ConfigError

# A cgroup without a limit reports a number near 2**63 (v1) or "max" (v2); anything this large means "no limit".
_NO_LIMIT = 2 ** 60


@dataclass(frozen=True)
class Need:
    """Bytes one setting makes the run hold, with what they are (for the message) and the setting that sets them."""

    key: str       # the setting to lower, e.g. "data.eval_n"
    what: str      # e.g. "64 held-out images of 3x64x64 float32, read one by one and then stacked"
    bytes: int


def available_memory() -> tuple[int, str] | None:
    """(bytes this process can still allocate, where the figure comes from), or None where nothing can be read.

    The least of: the host's MemAvailable (/proc/meminfo), the limit less the usage of the cgroup mounted at
    /sys/fs/cgroup (v2 or v1: a container's own share, under a cgroup namespace), and the address-space limit
    (`ulimit -v`) less this process's size. Never a fixed host size."""
    found = []
    meminfo = _kib_fields(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "MemAvailable in /proc/meminfo"))
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path("/sys/fs/cgroup", limit)), _read_int(Path("/sys/fs/cgroup", usage))
        if cap is not None and used is not None and cap < _NO_LIMIT:
            found.append((max(cap - used, 0), f"the cgroup's /sys/fs/cgroup/{limit} less its usage"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _kib_fields(Path("/proc/self/status")).get("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        found.append((max(soft - size, 0), "the address-space limit (ulimit -v) less this process's size"))
    return min(found) if found else None


def check_fits(needs: Sequence[Need], stage: str) -> None:
    """ConfigError (exit 2) when the bytes `needs` add up to exceed the memory this process can still allocate.

    The needs are a lower bound (the arrays the settings ask for, not the models' working memory), so a refusal is
    certain: the run could not have finished. Where no figure can be read (not Linux), nothing is checked."""
    available = available_memory()
    total = sum(need.bytes for need in needs)
    if available is None or total <= available[0]:
        return
    biggest = max(needs, key=lambda need: need.bytes)
    raise ConfigError(f"{stage}: these settings need more memory than this machine has available",
                      expected=f"at most {_size(available[0])} ({available[1]})",
                      found=f"at least {_size(total)}: " + "; ".join(f"{need.key}: {need.what} = {_size(need.bytes)}"
                                                                    for need in needs if need.bytes),
                      fix=f"lower {biggest.key} (or run on a machine with more memory)")


def _size(count: int) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more (TiB at most)."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= scale:
            return f"{count / scale:,.3g} {unit}" if count < 1000 * scale else f"{count / scale:,.0f} {unit}"
    return f"{count} B"


def _kib_fields(path: Path) -> dict[str, int]:
    """The "Name:   123 kB" lines of a /proc file, in bytes ({} where the file does not exist)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
