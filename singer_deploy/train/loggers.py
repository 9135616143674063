"""Where training scalars go: `metrics.jsonl` always, TensorBoard on request (`train.loggers: [jsonl, tensorboard]`).

Every logger receives the same record per logging step (loss terms, lr, images/s and the target-artifact metrics
per distilled layer, see loop._log_record), so TensorBoard curves and metrics.jsonl never disagree. TensorBoard goes
through torch's own `torch.utils.tensorboard.SummaryWriter` (needs the `tensorboard` package: the
`singer-deploy[tensorboard]` extra) into `<run>/tensorboard/`; a resumed run purges the events logged after its
checkpoint, a run started over all earlier events, as metrics.jsonl is trimmed (tests/test_loggers.py reads them
back with TensorBoard's EventAccumulator).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from singer_deploy.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class MetricsLogger(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    def __init__(self, path: Path):
        self.path = path

    def log(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """One scalar per numeric record field, tagged with the field's metrics.jsonl name, at the record's step."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        writer_class = import_summary_writer()
        self.writer = writer_class(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def import_summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError("train.loggers asks for tensorboard, which is not installed",
                          expected="the tensorboard package", found=f"ImportError: {err}",
                          fix="pip install 'singer-deploy[tensorboard]', or drop tensorboard from train.loggers"
                          ) from err
    return SummaryWriter


def open_loggers(names: tuple[str, ...], out_dir: Path, metrics_path: Path, resumed_at: int = 0
                 ) -> list[MetricsLogger]:
    """The loggers `names` asks for (metrics.jsonl is always one of them: resume and the report read it)."""
    loggers: list[MetricsLogger] = [JsonlLogger(metrics_path)]
    if "tensorboard" in names:
        # TensorBoard hides every event of an earlier session at or after purge_step (a SessionLog.START marker):
        # the steps after the checkpoint are logged again, and a run started over (resumed_at 0) drops them all,
        # as metrics.jsonl is trimmed.
        loggers.append(TensorBoardLogger(out_dir / TENSORBOARD_DIR, purge_step=resumed_at + 1))
    return loggers
