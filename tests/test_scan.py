"""`singer-deploy scan` (evaluation/scan.py, reporting/scan_page.py, pipeline api.scan and the CLI command): the
planted teacher's artifact blocks are found with shares near the truth, its clean twin gets "no artifacts found",
the scan.json schema, the page's first heading, a bare timm name, the suggestions and the exit code of bad input."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
import torch

from conftest import SMALL_PLANTED
from singer_deploy.evaluation.scan import HIGH_NORM, BlockScan, _token_sample, notes, scan_teacher, suggest, verdict
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.pipeline.cli import EXIT_INPUT, EXIT_OK, main

BLOCK_KEYS = {"block", "artifact_share", "artifact_ratio", "threshold", "rank", "writers", "histogram"}
PLANTED_OVERRIDES = [f"teacher.planted.{key}={value}" for key, value in asdict(SMALL_PLANTED).items()
                     if value is not None]


def _images(n: int = 64) -> torch.Tensor:
    return stack_images(SyntheticShapes(n, SMALL_PLANTED.img_size, SMALL_PLANTED.patch_size, flat_share=0.08, seed=5))


def test_the_planted_artifact_blocks_are_found_with_their_share_and_strength(small_planted):
    images = _images()
    truth = float(small_planted.artifact_mask(images).float().mean())
    result = scan_teacher(small_planted.backbone, images.split(16), name="planted")
    first = SMALL_PLANTED.artifact_layer
    for block in result.blocks:
        if block.block < first:
            assert block.artifact_share == 0 and block.artifact_ratio == 0, block
        else:
            assert block.artifact_share == pytest.approx(truth, abs=0.01), block
            assert block.artifact_ratio == pytest.approx(SMALL_PLANTED.rho, rel=0.3), block
            assert block.rank >= 1 and first in block.writers and block.threshold is not None
            assert block.untreated_high_norm_share == 0
    last = result.blocks[-1]
    assert result.verdict == (f"artifacts from block {first} on, {last.artifact_share:.1%} of tokens, "
                              f"~{last.artifact_ratio:.2g}x")
    assert result.layers == [first] and result.distilled == [first, SMALL_PLANTED.depth - 1]
    assert result.rank == 8     # one planted direction, rounded up to the rank step


def test_the_clean_twin_has_no_artifacts(small_planted):
    result = scan_teacher(small_planted.clean, _images().split(16), name="clean twin")
    assert result.verdict == "no artifacts found"
    assert [block.artifact_share for block in result.blocks] == [0.0] * SMALL_PLANTED.depth
    assert [block.artifact_ratio for block in result.blocks] == [0.0] * SMALL_PLANTED.depth
    assert result.rank is None and result.notes == []


def test_the_estimate_reads_the_prefix_and_the_same_sampled_positions_at_every_block():
    tokens = torch.arange(2 * 11, dtype=torch.float32).reshape(2, 11, 1).expand(-1, -1, 3)
    taps = {0: tokens, 1: tokens + 100}
    sampled = _token_sample(taps, 1, 4, torch.Generator().manual_seed(0))
    assert sampled[0].shape == (2, 5, 3)
    torch.testing.assert_close(sampled[1], sampled[0] + 100)                 # same positions at every block
    assert sampled[0][:, 0, 0].tolist() == [0.0, 11.0]                       # each image's prefix token kept
    assert all(len(set(row[1:, 0].tolist())) == 4 for row in sampled[0])     # distinct positions
    assert _token_sample(taps, 1, 10, torch.Generator()) is taps             # no more than `keep`: all of them


def _block(block: int, share: float = 0.0, *, rank: int = 0, left_out: int = 0, untreated: float = 0.0,
           ratio: float = 0.0) -> BlockScan:
    return BlockScan(block, share, ratio, 0.3 if rank else None, "subspace component", rank, left_out,
                     {block: 1.0} if rank else {}, untreated, untreated, [], "")


def test_suggested_layers_start_at_the_first_artifact_block_and_rank_counts_left_out_directions():
    # 24 blocks, artifacts from block 19: the reference intermediate layer (17) has nothing to refine yet.
    blocks = [_block(b, 0.05 if b >= 19 else 0.0, rank=3 if b >= 19 else 0, left_out=6 if b == 23 else 0, ratio=9.0)
              for b in range(24)]
    layers, distilled, rank, reasons = suggest(blocks, 24, 1024)
    assert (layers, distilled, rank) == ([19], [19, 23], 16)     # 3 + 6 directions -> the next multiple of 8
    assert "first with artifacts" in reasons[0]
    # Artifacts early: the reference position stays (block 17 of 24, as the published ViT-L setting).
    early = [_block(b, 0.05 if b >= 4 else 0.0, rank=1 if b >= 4 else 0, ratio=3.0) for b in range(24)]
    assert suggest(early, 24, 1024)[:3] == ([17], [17, 23], 8)
    assert verdict(early) == "artifacts from block 4 on, 5.0% of tokens, ~3x"
    # A rank never exceeds the width.
    assert suggest([_block(0), _block(1, 0.1, rank=30)], 2, 16)[2] == 16


def test_no_artifacts_is_only_said_when_no_high_norm_mode_is_left_untreated():
    """Issue 30, item 4: a high-norm mode the selection did not pick is named, never hidden behind "none found"."""
    clean = [_block(b) for b in range(6)]
    assert verdict(clean) == "no artifacts found" and notes(clean, [4, 5]) == []
    missed = [_block(b, untreated=0.02 if b == 3 else 0.0) for b in range(6)]
    assert "no artifacts found" not in verdict(missed).replace("no artifacts found by the selection", "")
    assert f"block 3 has 2.0% of tokens above {HIGH_NORM:g}x" in verdict(missed)
    assert "at block 3 (2.00%):" in notes(missed, [4, 5])[0]
    spread = [_block(b, untreated=0.001 * b) for b in range(6)]
    assert "at blocks 1-5 (up to 0.50%):" in notes(spread, [4, 5])[0]
    # Artifacts that stop before the last block are not "from block k on".
    middle = [_block(b, 0.05 if b in (2, 3) else 0.0, rank=1, ratio=6.24) for b in range(6)]
    assert verdict(middle) == "artifacts at blocks 2-3, 5.0% of tokens, ~6.2x (at block 3)"


def test_cli_writes_scan_json_and_a_page_whose_first_heading_is_the_verdict(tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", "planted", *PLANTED_OVERRIDES, "--out", str(out)]) == EXIT_OK
    facts = json.loads((out / "scan.json").read_text())
    assert [block["block"] for block in facts["blocks"]] == list(range(SMALL_PLANTED.depth))
    for block in facts["blocks"]:
        assert BLOCK_KEYS <= set(block)
        assert isinstance(block["artifact_share"], float) and isinstance(block["artifact_ratio"], float)
        assert len(block["histogram"]) == len(facts["histogram_edges_log10"]) - 1
        assert sum(block["histogram"]) == facts["images"] * (SMALL_PLANTED.img_size // SMALL_PLANTED.patch_size) ** 2
    assert facts["suggested"]["layers"] == [SMALL_PLANTED.artifact_layer]
    page = (out / "scan.html").read_text()
    first_heading = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert facts["verdict"] in first_heading and first_heading.index("artifacts from block") < 60
    assert page.index("<h1>") < page.index("<h2>")
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert facts["verdict"] in capsys.readouterr().out
    # Scanning again into the same directory replaces the scan (it is a directory singer-deploy made).
    assert main(["scan", "planted", *PLANTED_OVERRIDES, "--out", str(out)]) == EXIT_OK


def test_a_bare_timm_name_is_scanned(tmp_path):
    """A tiny random ViT (no download): random weights have no artifacts, so every share must be 0."""
    out = tmp_path / "tiny"
    assert main(["scan", "vit_tiny_patch16_224", "teacher.kwargs={img_size: 32, depth: 3}", "data.eval_n=16",
                 "--out", str(out)]) == EXIT_OK
    facts = json.loads((out / "scan.json").read_text())
    assert facts["teacher"] == "vit_tiny_patch16_224" and facts["images"] == 16
    assert [block["block"] for block in facts["blocks"]] == [0, 1, 2]


def test_the_api_takes_the_same_config(tmp_path):
    import singer_deploy

    result = singer_deploy.scan({"teacher": {"name": "planted", "planted": asdict(SMALL_PLANTED)},
                                 "data": {"eval_n": 32}}, out_dir=tmp_path / "api")
    assert result.images == 32 and result.files["json"].is_file() and result.files["page"].is_file()
    assert result.blocks[SMALL_PLANTED.artifact_layer].artifact_share > 0


@pytest.mark.parametrize("argv", [["singer.select_k=-1"], ["teacher.planted.depht=4"], ["data.source=/no/such/dir"]],
                         ids=["bad value", "unknown key", "missing images"])
def test_bad_input_exits_2_with_expected_found_fix(tmp_path, capsys, argv):
    assert main(["scan", "planted", *argv, "--out", str(tmp_path / "bad")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(word in err for word in ("Expected:", "Found:", "Fix:")), err
    assert not (tmp_path / "bad").exists()


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing.yaml")]) == EXIT_INPUT
    assert "Expected:" in capsys.readouterr().err
