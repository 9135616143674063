"""SiNGER vs FitNet on the planted-artifact teacher at two artifact shares, plus the quantile-target trap.

Runs `singer_deploy.evaluation.study.compare_methods` with the settings of docs/method.md, "Traps" (64 px, patch 8,
D=96, 8 blocks, artifacts at block 4; student D=64, 4 blocks; layers [4] + last; 300 steps, lr 3e-3, adapter lr
1e-2) and prints one table. The planted teacher has random weights apart from the planted circuit, so probe scores
sit at chance for every row: they are printed, not used to rank. This validates mechanics, not real-world efficacy.

Each SiNGER student is also exported (ONNX, OpenVINO FP32 + FP16 IR, where installed) and probed through every
artifact's runner; a second table shows those scores and their differences from eager PyTorch's.

    python benchmarks/compare_planted.py [--steps 300] [--out DIR] [--export-formats onnx,openvino | none]
                                         [--paper-last-layer]

"HNR last" / "E_out last": a student's own last block, a teacher's block 7. "tgt cos@5": the refined layer-4 target
vs the raw one after teacher block 5, on normal tokens. Rerunning with the same --out reuses finished runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from singer_deploy.models.backbone import load_backbone
from singer_deploy.evaluation.study import RUNNER_COLUMNS, compare_methods, installed_export_formats
from singer_deploy.config import SingerConfig
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.config import TrainConfig
from singer_deploy.models.planted import build_planted_teacher

LAYER = 4
# (share, outlier target, methods): the quantile run shows the trap at 8% (> 1 - alpha = 3% of patches are artifacts).
RUNS = ((0.08, "median", ("fitnet", "singer")), (0.08, "quantile", ("singer",)), (0.02, "median", ("fitnet", "singer")))
COLUMNS = (("method", "method"), ("target", "target"), ("share", "share"),
           ("target_hnr_4@4", "tgt HNR@4"), ("target_e_out@4", "tgt E_out@4"), ("target_cos@4", "tgt cos@4"),
           ("target_next_cos@4", "tgt cos@5"), ("target_cos@7", "tgt cos@7"),
           ("hnr_4@4", "teacher HNR@4"), ("hnr_4", "HNR last"), ("e_out", "E_out last"),
           ("proj_hnr_4@4", "proj HNR@4"), ("proj_e_out@4", "proj E_out@4"),
           ("proj_hnr_4@7", "proj HNR@7"), ("proj_e_out@7", "proj E_out@7"),
           ("normal_cos_raw@4", "proj cos raw@4"), ("normal_cos_clean@4", "proj cos clean@4"),
           ("knn_acc", "kNN"), ("linear_acc", "linear"), ("miou", "mIoU"))


def make_student():
    return load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--export-formats", default=",".join(installed_export_formats()) or "none",
                        help="formats the SiNGER student is exported to and probed through (default: the installed "
                             "ones), or 'none'")
    parser.add_argument("--paper-last-layer", action="store_true",
                        help="last-layer L_info as published (cosine Gram only); default adds the next-block MSE "
                             "(SingerConfig.last_block_info), which keeps last-layer normal tokens faithful")
    args = parser.parse_args()
    formats = () if args.export_formats == "none" else tuple(args.export_formats.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="compare_planted_"))
    planted = build_planted_teacher()
    train = TrainConfig(steps=args.steps, batch_size=32, lr=3e-3, adapter_lr=1e-2)
    table, runner_table, notes = [], [], set()
    for share, target, methods in RUNS:
        singer = SingerConfig(rank=8, outlier_target=target, detach_target=True, info_variant="paper",
                              last_block_info=not args.paper_last_layer)
        began = time.perf_counter()
        result = compare_methods(planted.backbone, make_student,
                                 SyntheticShapes(args.train_images, 64, 8, flat_share=share, seed=0),
                                 SyntheticShapes(args.eval_images, 64, 8, flat_share=share, seed=1),
                                 out / f"share{share:g}_{target}", layers=[LAYER], singer=singer, train=train,
                                 clean_teacher=planted.clean, methods=methods, export_formats=formats)
        print(f"share {share:g}, target {target}: {time.perf_counter() - began:.0f} s -> {result.files['markdown']}",
              flush=True)
        notes.update(note for note in result.notes if "chance" in note)
        for row in result.rows:
            if row["role"] == "reference" and target != "median":
                continue  # the teacher rows of a share are printed once
            table.append({**row, "share": share, "target": target if row["method"] == "singer" else "—"})
        runner_table += [{"share": share, "target": target, **row} for row in result.runner_rows]
    print()
    _print_table(table, COLUMNS)
    if runner_table:
        print("\nSiNGER student through each runner (differences are absolute, vs pytorch/fp32):\n")
        _print_table(runner_table, [("share", "share"), ("target", "target")] + [(k, k) for k in RUNNER_COLUMNS])
    for note in sorted(notes):
        print(f"\n- {note}")


def _print_table(rows: list[dict], columns) -> None:
    print("| " + " | ".join(header for _, header in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(key), key) for key, _ in columns) + " |")


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        # A float-rounding feature gap must not print as 0.000.
        return f"{value:.1e}" if "diff" in key and value != 0.0 else f"{value:.3f}"
    return str(value)


if __name__ == "__main__":
    main()
