"""A demo-size report opened in a real browser (headless Chromium, a 1,280 x 900 window): the verdict block is the
first section and fits the first screen, nothing on the page is wider than the window (wide tables scroll inside
their own box), and no table cell prints more than 4 decimals or an exponent a value >= 1e-3 does not need.

Skipped, with the reason, where no Chromium is installed (.ci/run installs it with the system package manager).
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from singer_deploy.export.parity import compare_outputs
from singer_deploy.pipeline.cli import demo_config_path
from singer_deploy.reporting.report import ReportData, write_report
from singer_deploy.reporting.verdict import build_verdict

WINDOW = (1280, 900)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SOURCES = ("raw teacher", "clean twin", "refined teacher", "student", "student (projected)")

# Writes the layout facts into the page, where --dump-dom prints them. Elements inside a box that scrolls (or clips)
# are that box's business; everything else must lie inside the window.
PROBE = """<script>
const inScroller = el => { for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
  const o = getComputedStyle(a).overflowX; if (o === "auto" || o === "scroll" || o === "hidden") return true; }
  return false; };
const wide = [];
for (const el of document.body.querySelectorAll("*")) {
  const r = el.getBoundingClientRect();
  if ((r.width || r.height) && !inScroller(el) && (r.right > innerWidth + 0.5 || r.left < -0.5))
    wide.push(`${el.tagName.toLowerCase()}#${el.id}.${el.className} ${Math.round(r.left)}..${Math.round(r.right)}`);
}
const verdict = document.getElementById("verdict").getBoundingClientRect();
const facts = {innerWidth, innerHeight, scrollWidth: document.documentElement.scrollWidth, wide,
  firstSection: document.querySelector("section").id, verdictTop: verdict.top, verdictBottom: verdict.bottom,
  cells: [...document.querySelectorAll("td, th")].map(c => c.textContent)};
const out = document.createElement("pre"); out.id = "layout-facts"; out.textContent = JSON.stringify(facts);
document.body.appendChild(out);
</script>"""


def _browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _demo_size_report(folder) -> ReportData:
    """What `singer-deploy demo` hands the report: 6 images of 64 px, an 8 x 8 grid, 5 sources at 2 layers, 150
    training steps, 3 artifacts with 3 outputs each, a latency table of every column, the demo's config."""
    rng = np.random.default_rng(0)
    n, grid, dim = 6, 8, 64
    maps = {source: rng.uniform(1, 2, (n, grid, grid)) * (10 if source == "raw teacher" else 1) for source in SOURCES}
    reference = {"cls": rng.normal(size=(12, dim)), "patch_tokens": rng.normal(size=(12, grid * grid, dim)),
                 "projected": rng.normal(size=(12, grid * grid, 96))}
    reports = {key: compare_outputs(reference, {k: v + rng.normal(scale=scale, size=v.shape)
                                                for k, v in reference.items()}, key.split("/")[1],
                                    candidate_name=key)
               for key, scale in (("onnx/fp32", 1e-7), ("openvino/fp32", 1e-7), ("openvino/fp16", 1e-3))}
    latency = [{"runner": runner, "realised_precision": runner.split("/")[1].split("@")[0], "parity": "pass",
                "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3, "min_ms": p50 * 0.9,
                "throughput_ips": 8000 / p50, "throughput_batch": 8, "size_mb": 0.835, "build_s": 1.2345,
                "load_s": 0.0456, "peak_rss_mb": 1234.5678, "iters": 1166, "speedup_vs_pytorch/fp32": 4.29 / p50,
                "info": {"runtime": "openvino 2026.4.1", "hint": "f32", "threads": 2}}
               for runner, p50 in (("pytorch/fp32", 4.29), ("onnx/fp32", 1.63), ("openvino/fp32", 1.70),
                                   ("openvino/fp16", 1.66), ("openvino/fp32@default", 1.75),
                                   ("openvino/fp16@default", 1.44))]
    rows = [{"method": source, "layer": layer, "hnr_2": 0.119, "hnr_3": 0.0823, "hnr_4": 0.000976562,
             "e_out": 0.35, "r_max": 12.345678, "artifact_tokens": 1284, "artifact_ratio": 10.4349 / (i + 1),
             "artifact_ratio_p90": 11.1, "normal_cos": 0.99998, "normal_cos_p1": 0.9961, "next_cos": 0.99992,
             "next_cos_p1": 0.9876, "artifact_cos_clean": 0.0912 * (i + 1), "artifact_cos_clean_p1": 0.05}
            for layer in (4, 7) for i, source in enumerate(SOURCES)]
    warnings = ["INT8 on openvino is slower than FP32 here (0.70x): it ships because int8 was asked for"]
    verdict = build_verdict(parity=reports, artifact_rows=rows, judged=SOURCES[2:], latency_rows=latency,
                            warnings=warnings)
    metrics = [{"step": step, "loss": 1 / step, "kd": 0.5 / step, "out": 0.01, "info": 0.02, "lr": 0.003,
                "img_s": 120.5} for step in range(10, 151, 10)]
    summary = {"method": "singer", "teacher_layers": [4, 7], "student_layers": [2, 3], "distill_seconds": 54.6,
               "nullspace k below tau": {"4": "45 (smallest rule, rank 8)", "7": "47 (smallest rule, rank 8)"},
               "quantile trap": "not applicable (outlier_target subspace)",
               "artifact subspace": {layer: "1 direction written by block 4 (100%); explains 99.9% of the artifact "
                                            "tokens' excess energy (1288 artifact / 15096 normal tokens)"
                                     for layer in ("4", "7")}, "target": "avx2",
               # One unbreakable value (an image folder's path), as real runs print: only a scroll box holds it.
               "unreadable images skipped": "1 of 5000 files (first: /data/" + "images_" * 40 + "0001.jpg)"}
    return ReportData(
        title="singer-deploy run", verdict=verdict, summary=summary,
        config=yaml.safe_load(demo_config_path().read_text()),
        versions={"torch": "2.14.1", "cpu": "Intel(R) Xeon(R) Platinum 8480+ " * 3, "flags": "avx2 avx512f " * 20},
        images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), norm_maps=maps,
        norm_histograms={source: maps[source] for source in SOURCES[:4]},
        pca_tokens={source: rng.normal(size=(n, grid * grid, dim)) for source in SOURCES[:4]},
        metrics=metrics, parity=[row for report in reports.values() for row in report.table_rows()],
        latency=latency, artifacts=rows)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here (tried " + ", ".join(BROWSERS) + "); `apt-get install chromium` enables this "
                    "test (.ci/run does it where apt-get is available)")
    folder = tmp_path_factory.mktemp("browser")
    report = write_report(folder / "report.html", _demo_size_report(folder))
    probed = folder / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000", "--dump-dom",
                           probed.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="layout-facts">(.*?)</pre>', done.stdout, re.S)
    assert found, f"{browser} printed no layout facts (exit {done.returncode}): {done.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


def test_nothing_is_wider_than_the_window(layout):
    assert layout["innerWidth"] == WINDOW[0]
    assert layout["wide"] == [] and layout["scrollWidth"] <= WINDOW[0]


def test_the_verdict_block_is_first_and_on_the_first_screen(layout):
    assert layout["firstSection"] == "verdict"
    assert 0 <= layout["verdictTop"] < layout["verdictBottom"] <= layout["innerHeight"]


def test_no_cell_has_more_than_4_decimals_or_an_unneeded_exponent(layout):
    cells = layout["cells"]
    assert len(cells) > 100
    assert [cell for cell in cells if re.search(r"\d\.\d{5,}", cell)] == []
    exponents = [float(number) for cell in cells for number in re.findall(r"\d(?:\.\d+)?e[+-]\d+", cell)]
    assert exponents and max(exponents) < 1e-3
