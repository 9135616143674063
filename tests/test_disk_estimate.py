"""benchmarks/disk_estimate.py: it runs, its rows match the files a demo-size run writes, and the table of the DINOv2
example in docs/results.md, and the README's headline figure, are what it prints."""

import fnmatch
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KB = 1024


def _disk_estimate():
    spec = importlib.util.spec_from_file_location("disk_estimate", ROOT / "benchmarks" / "disk_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["disk_estimate"] = module   # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config (examples/demo.yaml) with 2 training steps on 16 images and no latency benchmark: the same
    models, exports and goldens as the demo, so the same file sizes (metrics.jsonl aside)."""
    from singer_deploy.pipeline.api import distill_and_export

    folder = tmp_path_factory.mktemp("disk")
    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    raw["train"].update(steps=2, log_every=1, checkpoint_every=2)
    raw["data"]["n"] = 16
    raw["export"]["benchmark"] = False
    raw["out_dir"] = str(folder / "run")
    config = folder / "demo_small.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, distill_and_export(str(config), progress=False).out_dir


def test_every_row_matches_the_files_of_a_demo_size_run(demo_run):
    config, run_dir = demo_run
    module = _disk_estimate()
    rows, _ = module.estimate(str(config))
    sizes = {str(path.relative_to(run_dir)): path.stat().st_size for path in run_dir.rglob("*") if path.is_file()}
    counted = {name for row in rows for name in row.files}
    uncounted = {name for name in sizes if name not in counted}
    # Every file of the run is counted by a row or is one of the kinds the script says it leaves out.
    assert all(any(fnmatch.fnmatch(Path(name).name if pattern.startswith("*") else name, pattern)
                   for pattern in module.NOT_COUNTED) for name in uncounted), uncounted
    for row in rows:
        assert row.files and set(row.files) <= set(sizes), row.label   # the demo writes every file it counts
        actual = sum(sizes[name] for name in row.files)
        if row.files[0].endswith(".npz"):
            # Compressed arrays: the uncompressed count is an upper bound; float32 features shrink little.
            assert 0.5 * row.bytes <= actual <= row.bytes, (row.label, actual)
        elif row.files[0] == "metrics.jsonl":
            assert 0.2 * row.bytes <= actual <= 5 * row.bytes, (row.label, actual)   # "~1 kB" a record
        else:
            # Raw tensor bytes plus the format's overhead: headers, pickle, graph text of the demo's 4-block ViT.
            assert -0.01 * row.bytes <= actual - row.bytes <= 256 * KB, (row.label, actual, row.bytes)


def test_the_documented_table_and_headline_are_what_the_script_prints_for_the_dinov2_example(capsys):
    module = _disk_estimate()
    assert module.main([str(ROOT / "examples" / "dinov2_vitl14_to_vits14.yaml")]) == 0
    printed = dict(re.findall(r"^\| (\S+)[^|]*\| \**([\d,.]+)\** \|$", capsys.readouterr().out, re.M))
    results = ROOT.joinpath("docs", "results.md").read_text()
    table = results[results.index("## Disk use of the DINOv2 example"):]
    table = table[:table.index("\n\n", table.index("| file | MB |"))]
    documented = dict(re.findall(r"^\| (\S+)[^|]*\| \**(?:about )?([\d,.]+)\** \|$", table, re.M))
    assert documented and documented == printed
    headline = re.search(r"^- Disk use of the DINOv2[^:]*: about ([\d,.]+) MB", ROOT.joinpath("README.md").read_text(),
                         re.M)
    assert headline and headline.group(1) == printed["**total**"]
