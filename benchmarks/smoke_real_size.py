"""Real-size CPU smoke run: ViT-L/16 -> ViT-S/16 (random weights) at 224 px through the whole pipeline.

    python benchmarks/smoke_real_size.py                  # 3 steps of batch 4, ONNX + OpenVINO, about 10 min on 2 cores
    python benchmarks/smoke_real_size.py --steps 1 --formats onnx --no-bench   # the shortest real-size path

It runs `distill_and_export` (training, merge, ONNX + OpenVINO export, parity, goldens, latency bench, artifact
analysis, report) at the real model sizes, on the CPU, and prints the wall time of each stage, the peak resident
memory of the process and the size of every file written: it shows the real-size path works on a small machine
(the repository's tests use tiny models). The figures are this machine's; training at this size belongs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    args = _parse()
    import torch

    from singer_deploy.pipeline.api import distill_and_export

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="smoke_real_size_")) / "run"
    config = {
        "teacher": {"name": "vit_large_patch16_224"},
        "student": {"name": "vit_small_patch16_224"},
        "data": {"n": args.steps * args.batch, "eval_n": args.eval_n, "flat_share": 0.02},
        "layers": [17],
        "train": {"steps": args.steps, "batch_size": args.batch, "log_every": 1, "checkpoint_every": args.steps,
                  "warmup_steps": 0, "device": "cpu"},
        "export": {"formats": args.formats, "benchmark": not args.no_bench},
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"ViT-L/16 -> ViT-S/16 random weights, 224 px, layers [17] + last, {args.steps} step(s) of batch "
          f"{args.batch}, {args.eval_n} evaluation images, formats {args.formats}; out_dir {out_dir}", flush=True)
    began = time.perf_counter()
    result = distill_and_export(config, out_dir=str(out_dir), progress=False)
    total = time.perf_counter() - began
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB

    stages = {key.removesuffix("_s"): seconds for key, seconds in result.timings.items() if key != "total_s"}
    # The pipeline times setup, distill, export and bench; what remains is merge, analysis, report and manifest.
    stages["merge + analysis + report + manifest"] = total - sum(stages.values())
    print(f"\nparity passed: {result.passed}\n")
    print("| stage | wall s |\n|---|---|")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| total | {total:.1f} |\n\npeak resident memory: {peak_gib:.2f} GiB\n")
    print("| file | MiB |\n|---|---|")
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    for path in files:
        print(f"| {path.relative_to(out_dir)} | {path.stat().st_size / 2 ** 20:.2f} |")
    print(f"| all {len(files)} files | {sum(p.stat().st_size for p in files) / 2 ** 20:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "passed": result.passed, "stages_s": stages, "total_s": total, "peak_rss_gib": peak_gib,
            "files_mib": {str(p.relative_to(out_dir)): p.stat().st_size / 2 ** 20 for p in files},
            "config": config}, indent=2))
    sys.exit(0 if result.passed else 1)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-n", type=int, default=12, help="held-out images (parity's kNN@10 needs >= 11)")
    parser.add_argument("--formats", nargs="+", default=["onnx", "openvino"])
    parser.add_argument("--no-bench", action="store_true", help="skip the latency benchmark stage")
    parser.add_argument("--out-dir", help="where the run directory goes (default: a new temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args()


if __name__ == "__main__":
    main()
