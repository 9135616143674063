import json

import numpy as np
import pytest

from export_fixtures import shape_images, tiny_vit
from singer_deploy.errors import ConfigError
from singer_deploy.export.bench import add_ratios, benchmark_runners, markdown_table, peak_rss_mb, to_json
from singer_deploy.export.runner import TorchRunner


def test_benchmark_rows_table_and_json():
    images = shape_images(3, 32, 16)
    runner = TorchRunner(tiny_vit("vit_tiny_patch16_224", img_size=32))
    (row,) = benchmark_runners({"torch": runner}, images, warmup=1, iters=5, throughput_batch=4,
                               throughput_iters=2)
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["throughput_ips"] > 0 and row["peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.5)
    slower = {**row, "runner": "slow", "p50_ms": 2 * row["p50_ms"]}
    rows = add_ratios([row, slower], baseline="torch")
    assert rows[0]["speedup_vs_torch"] == 1.0 and rows[1]["speedup_vs_torch"] == pytest.approx(0.5)
    table = markdown_table(rows, ["runner", "p50_ms", "speedup_vs_torch"])
    assert table.splitlines()[0] == "| runner | p50_ms | speedup_vs_torch |" and "| slow |" in table
    assert json.loads(to_json(rows))[1]["runner"] == "slow"
    with pytest.raises(ConfigError, match="baseline"):
        add_ratios(rows, baseline="tensorrt")
    with pytest.raises(ConfigError):
        benchmark_runners({"torch": runner}, np.zeros((3, 32, 32), np.float32))


def test_iterations_follow_the_time_budget_within_bounds():
    from singer_deploy.export.bench import MAX_ITERS, MIN_ITERS, calls_for_budget

    assert calls_for_budget(2.0, 0.01) == 200 and calls_for_budget(2.0, 1.0) == MIN_ITERS
    assert calls_for_budget(2.0, 1e-7) == MAX_ITERS
    images = shape_images(3, 32, 16)
    runner = TorchRunner(tiny_vit("vit_tiny_patch16_224", img_size=32))
    (row,) = benchmark_runners({"torch": runner}, images, warmup=2, budget_s=0.2, rounds=2, throughput_batch=2,
                               parity={"torch": True})
    assert MIN_ITERS <= row["iters"] <= MAX_ITERS
    assert row["parity"] == "pass" and row["realised_precision"] == "fp32"


def test_openvino_rows_at_the_parity_hint_and_the_deployment_default(reg_artifacts):
    from singer_deploy.export.bench import eager_device, with_deployment_defaults
    from singer_deploy.export.openvino import OpenVINORunner

    runners = with_deployment_defaults({"openvino/fp32": OpenVINORunner(reg_artifacts["ov_fp32"])})
    assert list(runners) == ["openvino/fp32", "openvino/fp32@default"]
    assert runners["openvino/fp32"].hint == "f32" and runners["openvino/fp32@default"].hint is None
    info = runners["openvino/fp32@default"].load().info
    assert info["requested_precision_hint"] == "default" and info["realised_precision"]
    assert eager_device(runners) == "cpu"
