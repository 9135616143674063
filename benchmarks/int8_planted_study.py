"""INT8 study on the planted-artifact teacher: do artifact-free students quantize better?

Distils a FitNet and a SiNGER student from the planted teacher with the same config, data, steps and seed (the demo
config unless --config is given), quantizes both with one precision policy and one calibration set (OpenVINO/NNCF and
ONNX Runtime Q/DQ), and prints their INT8-vs-own-FP32 parity and the activation ranges that explain it. Out of
sample: calibration uses the first --calibration training images, the comparison the held-out evaluation images, and
the study refuses to run if any comparison image is a calibration image (int8_study.json records the check).

    python benchmarks/int8_planted_study.py --steps 300 --case 8c [KEY=VALUE ...] --out runs/int8_study

--case picks the planted artifacts: 8c / 2c = 8% / 2% of the patches, content-triggered (the exactly flat patches);
8p / 2p = 8% / 2% of the patch positions, position-triggered. KEY=VALUE items override the config as on the CLI
(e.g. singer.preset=published). INT8 is encoded for this host (calibration/int8_scheme.py), as an export here
would be; the host line is printed with the table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from singer_deploy.calibration.study import int8_artifact_study
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.io import atomic_write_json
from singer_deploy.models.data import TeacherInput, image_array
from singer_deploy.pipeline.api import build_data, build_models
from singer_deploy.pipeline.cli import demo_config_path
from singer_deploy.pipeline.overrides import apply_overrides
from singer_deploy.pipeline.runconfig import load_run_config, read_config_file
from singer_deploy.train.loop import distill

CASES = {"8c": ["data.flat_share=0.08"], "2c": ["data.flat_share=0.02"],
         "8p": ["teacher.planted={trigger: position, position_share: 0.08}"],
         "2p": ["teacher.planted={trigger: position, position_share: 0.02}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(demo_config_path()))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--case", choices=tuple(CASES), default="8c")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/int8_study")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_run_config(apply_overrides(read_config_file(args.config), CASES[args.case] + args.overrides))
    students = {}
    for method in ("fitnet", "singer"):
        models = build_models(config)  # same seed -> the same student initialisation for both methods
        train_data, eval_images = build_data(config, TeacherInput.of(models.teacher))
        train = replace(config.train, method=method, steps=args.steps)
        result = distill(models.teacher, models.student, train_data, Path(args.out) / method, layers=config.layers,
                         singer=config.singer, train=train, progress=False)
        students[method] = (result.student.model.eval(), result.projectors.last)
    calib = build_data(config, TeacherInput.of(models.teacher))[0]
    calib_images = image_array(calib, range(args.calibration))
    study = int8_artifact_study(students["fitnet"][0], students["singer"][0], calib_images, eval_images,
                                names=("fitnet", "singer"),
                                projectors=(students["fitnet"][1], students["singer"][1]))
    atomic_write_json(Path(args.out) / "int8_study.json", study)
    print(f"case {args.case}, overrides {args.overrides or 'none'}; host: {host_capabilities().summary()}")
    print(_table(study))


def _table(study: dict) -> str:
    columns = ["student", "backend", "normal cos mean", "normal cos p1", "normal cos min", "artifact cos",
               "INT8 gate", "FP32 HNR_4", "FP32 E_out", "residual token max/median", "linear-input max |x|",
               "median-token INT8 levels"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, result in study.items():
        fp32, residual = result["fp32_artifact_metrics"], result["residual_ranges"]
        for backend, row in result["backends"].items():
            cells = [name, backend, row["normal_token_cosine"], row["normal_token_cosine_p1"],
                     row["normal_token_cosine_min"], row["artifact_token_cosine"],
                     "pass" if row["parity_passed"] else "fail", fp32["hnr"], fp32["e_out"],
                     residual["token_max_over_median_max"], result["activation_ranges"]["max_abs_max"],
                     residual["median_token_levels_min"]]
            lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
