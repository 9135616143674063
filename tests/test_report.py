import base64
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from singer_deploy.reporting import plots
from singer_deploy.errors import DataError
from singer_deploy.reporting.report import ReportData, load_metrics, write_report

_VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Collects images, links, table cells and structure errors (html.parser itself never rejects bad nesting)."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.srcs, self.hrefs, self.tags = [], [], [], [], []
        self.cells, self.row_classes = [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.srcs += [attrs["src"]] if "src" in attrs else []
        self.hrefs += [attrs["href"]] if "href" in attrs else []
        if tag == "tr":
            self.row_classes.append(attrs.get("class"))
        if tag == "td":
            self._cell = [attrs.get("class"), ""]
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "td":
            self.cells.append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data


def _parse(path: Path) -> tuple[_Checker, str]:
    text = path.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    return checker, text


def _assert_well_formed(checker: _Checker) -> None:
    assert checker.errors == []
    assert checker.stack == []
    assert checker.tags[:1] == ["html"]
    # Self-contained: no scripts, no stylesheets or links leaving the file.
    assert not {"script", "link", "iframe"} & set(checker.tags)
    assert all("http" not in ref for ref in checker.srcs + checker.hrefs)
    assert all(ref.startswith("#") for ref in checker.hrefs)


PARITY = [   # keys as ParityReport.table_rows writes them
    {"candidate": "onnx/fp32", "precision": "fp32", "output": "patch_tokens", "token_cos_min": 0.9999871,
     "token_cos_p1": 0.99999, "max_abs": 1.25e-5, "knn_overlap": 1.0, "passed": True},
    {"candidate": "openvino/int8", "precision": "int8", "output": "patch_tokens", "token_cos_min": 0.9123,
     "token_cos_p1": 0.95, "max_abs": 0.731, "knn_overlap": 0.875, "passed": False},
    {"candidate": "tensorrt/fp16", "precision": "fp16", "token_cos_min": None, "passed": None,
     "status": "skipped: TensorRT is not installed"},
]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    n, grid, dim = 3, 4, 8
    raw = rng.uniform(1.0, 2.0, (n, grid, grid)).astype(np.float32)
    raw[:, 0, 0] = 20.0  # a planted outlier
    refined = rng.uniform(1.0, 2.0, (n, grid, grid)).astype(np.float32)
    out = tmp_path_factory.mktemp("full")
    metrics = out / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1), "l_kd": 0.5, "l_out": 0.1, "l_info": 0.2,
                         "target_hnr": 0.01, "target_e_out": 0.3, "phase": "train"}) for s in range(6)]
    metrics.write_text("\n".join(lines) + '\n{"step": 6, "lo', encoding="utf-8")  # killed mid-write
    from singer_deploy.reporting.verdict import build_verdict

    artifacts = [{"method": "raw teacher", "layer": 4, "artifact_ratio": 10.43, "hnr_4": 0.078},
                 {"method": "refined teacher", "layer": 4, "artifact_ratio": 0.713, "hnr_4": 0.0}]
    data = ReportData(
        title="run <b>&</b> 'demo'",
        verdict=build_verdict(artifact_rows=artifacts, judged=("refined teacher",)), artifacts=artifacts,
        summary={"artifact rate": {"before": 0.031, "after": 0.002}, "p50 latency ms": 3.2},
        config={"teacher": "vit_tiny", "layers": (2, 3), "out_dir": Path("/tmp/run")},
        versions={"torch": "2.14.1", "timm": "1.0.31"},
        images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        norm_maps={"raw teacher": raw, "refined teacher": refined, "student": refined * 0.5},
        norm_histograms={"raw teacher": raw, "refined teacher": refined},
        pca_tokens={"raw teacher": rng.normal(size=(n, grid * grid, dim)),
                    "student": rng.normal(size=(n, grid, grid, dim))},
        metrics=metrics,
        parity=PARITY,
        latency=[{"runner": "onnx/fp32", "p50_ms": 3.21, "p90_ms": 3.9, "p99_ms": 5.5, "throughput_ips": 311.5,
                  "size_mb": 22.1, "speedup_vs_pytorch/fp32": 1.84}],
        comparison=[{"method": "SiNGER", "hnr_4": 0.002, "e_out": 0.01, "knn_acc": 0.71}],
    )
    return write_report(out / "report.html", data)


def test_full_report_embeds_every_figure_as_png(full_report):
    checker, _ = _parse(full_report)
    _assert_well_formed(checker)
    images = [src for src in checker.srcs if src.startswith("data:image/png;base64,")]
    assert len(images) == len(checker.srcs) == 4  # norm maps, histograms, PCA, training curves
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_report_tables_hold_the_given_values(full_report):
    checker, text = _parse(full_report)
    cell_text = [value for _, value in checker.cells]
    for expected in ["1 - 1.3e-05", "0.9123", "1.25e-05", "0.8750", "3.210", "311.5", "1.840", "SiNGER", "0.0020",
                     "skipped: TensorRT is not installed", "2.14.1", "before: 0.0310; after: 0.0020"]:
        assert expected in cell_text, expected
    assert ("pass", "PASS") in checker.cells and ("fail", "FAIL") in checker.cells and ("skip", "n/a") in checker.cells
    assert checker.row_classes.count("pass") == 1 and checker.row_classes.count("fail") == 1
    assert "token cosine min" in text and "artifact rate.before" not in text   # no dotted keys
    assert "Sections not run" not in text
    assert "<details>" in text and "out_dir: /tmp/run" in text


def test_full_report_escapes_text_and_keeps_a_truncated_metrics_file(full_report):
    _, text = _parse(full_report)
    assert "<b>&</b>" not in text and "run &lt;b&gt;&amp;&lt;/b&gt; &#x27;demo&#x27;" in text
    assert "6 logged records" in text  # the half-written last line is dropped, the rest plotted


def test_summary_only_report_names_the_sections_not_run(tmp_path):
    path = write_report(tmp_path, ReportData(summary={"status": "training crashed"}))
    assert path == tmp_path / "report.html"
    checker, text = _parse(path)
    _assert_well_formed(checker)
    assert checker.srcs == []
    banner = text.split("Sections not run: ", 1)[1].split(".</p>", 1)[0]
    assert banner.split(", ") == ["Verdict", "Norm maps", "Norm histograms", "PCA feature maps", "Training curves",
                                  "Artifacts per distilled layer", "Parity", "Latency", "Comparison",
                                  "Configuration", "Environment"]
    assert text.count("Not run: ") == 11
    assert "training crashed" in text


def test_missing_metrics_file_is_reported_not_raised(tmp_path):
    path = write_report(tmp_path / "r.html", ReportData(metrics=tmp_path / "nope.jsonl"))
    assert "nope.jsonl does not exist" in path.read_text(encoding="utf-8")


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    write_report(target, ReportData(summary={"a": 1}))
    write_report(target, ReportData(summary={"a": 2}))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    before = target.read_bytes()

    # Bad input fails before anything is written: the old report stays whole.
    with pytest.raises(DataError, match="mean/std"):
        write_report(target, ReportData(norm_maps={"raw": np.ones((1, 2, 2))}, images=np.full((1, 8, 8, 3), -1.5)))
    # A failure while moving into place leaves neither a temp file nor a damaged report.
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_report(target, ReportData(summary={"a": 3}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert target.read_bytes() == before


def test_pca_rgb_separates_two_regions_consistently_across_images():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=16)
    tokens = rng.normal(scale=0.05, size=(2, 4, 4, 16))
    tokens[:, :, :2] += direction  # left half vs right half differ along one direction
    tokens[:, :, 2:] -= direction
    rgb = plots.pca_rgb(tokens)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    left, right = rgb[:, :, :2, 0], rgb[:, :, 2:, 0]
    # First component splits the halves, the same way in both images (one PCA per source).
    assert np.all(np.abs(left.mean(axis=(1, 2)) - right.mean(axis=(1, 2))) > 0.8)
    assert np.sign(left.mean() - right.mean()) == np.sign(left[0].mean() - right[0].mean()) == np.sign(
        left[1].mean() - right[1].mean())
    np.testing.assert_array_equal(rgb, plots.pca_rgb(tokens.reshape(2, 16, 16)))  # (n, N, D) with square N


def test_bad_shapes_raise_data_errors():
    with pytest.raises(DataError, match="cannot be laid out"):
        plots.pca_rgb(np.zeros((1, 15, 4)))
    with pytest.raises(DataError, match="norm map 'student'"):
        plots.norm_maps_png({"raw": np.ones((2, 3, 3)), "student": np.ones((1, 3, 3))})
    with pytest.raises(DataError, match="fewer input images"):
        plots.norm_maps_png({"raw": np.ones((2, 3, 3))}, np.zeros((1, 8, 8, 3)))


def test_load_metrics_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 1, "loss": 0.5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="malformed line 2"):
        load_metrics(path)
    path.write_text('{"step": 0, "loss": 1}\n\n{"step": 1, "loss": 0.5}\n', encoding="utf-8")
    assert [r["loss"] for r in load_metrics(path)] == [1, 0.5]
    series = plots.metric_series(load_metrics(path) + [{"step": 2, "loss": 0.25, "ok": True, "tag": "x"}])
    assert list(series) == ["loss"]
    np.testing.assert_array_equal(series["loss"][0], [0, 1, 2])


def _section_table(text: str, anchor: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows of cells) of the one table in a report section, as plain text."""
    import html
    import re

    section = text.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]
    rows = [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section)]
    return rows[0], rows[1:]


def _rendered(key: str, value) -> str:
    from singer_deploy.reporting.report import cell_text

    if key == "passed":
        return {True: "PASS", False: "FAIL", None: "n/a"}[value]
    return cell_text(key, value)


def test_the_report_shows_parity_and_latency_rows_exactly_as_the_export_code_writes_them(tmp_path):
    from singer_deploy.export.bench import add_ratios, benchmark_runners
    from singer_deploy.export.parity import compare_outputs
    from singer_deploy.export.runner import Runner
    from singer_deploy.reporting.report import _LATENCY_COLUMNS, _PARITY_COLUMNS

    rng = np.random.default_rng(0)
    reference = {"patch_tokens": rng.normal(size=(12, 16, 8)), "cls": rng.normal(size=(12, 8))}
    noisy = {k: v + rng.normal(scale=0.05, size=v.shape) for k, v in reference.items()}
    parity = (compare_outputs(reference, reference, "fp32", candidate_name="onnx/fp32").table_rows()
              + compare_outputs(reference, noisy, "int8", candidate_name="openvino/int8").table_rows())

    class Scale(Runner):   # a minimal runner: the benchmark only sees the Runner contract
        name = "scale"

        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def _load(self):
            self.input_chw, self.info = (3, 8, 8), {"runtime": "numpy"}

        def _run(self, batch):
            return {"out": batch * self.factor}

    images = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    latency = add_ratios(benchmark_runners({"pytorch/fp32": Scale(1.0), "onnx/fp32": Scale(2.0)}, images,
                                           warmup=1, iters=3, rounds=1, throughput_iters=1), "pytorch/fp32")
    # Every column the report names is one the producer fills: nothing renamed, no column left empty.
    assert set(_PARITY_COLUMNS) <= set(parity[0]) and set(_LATENCY_COLUMNS) <= set(latency[0])

    text = write_report(tmp_path, ReportData(parity=parity, latency=latency)).read_text(encoding="utf-8")
    for anchor, rows, known in (("parity", parity, _PARITY_COLUMNS), ("latency", latency, _LATENCY_COLUMNS)):
        header, body = _section_table(text, anchor)
        keys = [next((k for k, label in known.items() if label == cell), cell) for cell in header]
        # Every key the producer wrote is shown: a mapping (a runner's info) in a collapsed table under it.
        nested = {key for key in rows[0] if isinstance(rows[0][key], dict)}
        assert set(keys) | nested == set(rows[0]) and not set(keys) & nested
        for key in nested:
            assert f"<summary>{known.get(key, key)} per row</summary>" in text
        assert body[:len(rows)] == [[_rendered(key, row[key]) for key in keys] for row in rows]


def test_the_verdict_comes_first_and_each_layer_gets_an_artifact_matrix(tmp_path):
    from singer_deploy.reporting.verdict import build_verdict

    rows = [{"method": source, "layer": layer, "student_block": 2, "artifact_ratio": ratio, "artifact_cos_clean": 0.9,
             "normal_cos": 0.999, "normal_cos_p1": 0.99, "next_cos": 0.998, "hnr_2": 0.05, "hnr_4": 0.001,
             "e_out": 0.2, "explained_share": 0.41, "normal_cos_clean_p1": 0.98}
            for layer in (4, 7)
            for source, ratio in (("raw teacher", 10.43), ("refined teacher", 0.71 if layer == 4 else 2.5))]
    warning = "low explained share at layer 7: 41% of the artifact gap"
    verdict = build_verdict(artifact_rows=rows, judged=("refined teacher",), warnings=[warning])
    text = write_report(tmp_path, ReportData(verdict=verdict, artifacts=rows, summary={"method": "singer"})).read_text()
    checker, _ = _parse(tmp_path / "report.html")
    _assert_well_formed(checker)
    body = text.split("<body>", 1)[1]
    assert body.index('<section id="verdict" class="WARN">') < body.index("<section") + 1   # the first section
    verdict_html = body.split('<section id="verdict"', 1)[1].split("</section>", 1)[0]
    assert warning in verdict_html and "removed" in verdict_html and "REMAIN" in verdict_html   # 0.71x / 2.5x
    for layer in (4, 7):
        matrix = text.split(f"<h3>Layer {layer}</h3>", 1)[1].split("<details>", 1)[0]
        header, body_rows = _section_table(f'<section id="m">{matrix}</section>', "m")
        assert header[:8] == ["source", "artifact / normal norm", "artifact cos to clean twin", "normal cos",
                              "normal cos p1", "next-block cos", "HNR_2", "HNR_4"]
        assert "explained_share" in header                 # a figure the report does not know still shows
        assert "e_out" not in header and "method" not in header and "student_block" not in header
        secondary = text.split(f"<h3>Layer {layer}</h3>", 1)[1].split("<details>", 1)[1].split("</details>", 1)[0]
        assert "normal_cos_clean_p1" not in header and "normal cos to clean twin p1" in secondary
        assert [row[0] for row in body_rows] == ["raw teacher", "refined teacher"]
    assert '<td class="num fail">10.43</td>' in text       # above the limit: marked
