"""Does SiNGER give a better student than a plain distillation? Downstream probes on planted teachers that know the
shapes task (docs/results.md, "Downstream: students of trained teachers").

Per planted family (compare_planted.py's --cases; default all ten, five families at 8% and 2%): the teacher trained by
PlantedTraining(--teacher-steps) (trained once per machine, then read from the cache), then per seed the same
student (compare_planted's ViT: 4 blocks, width 64; same initial weights for every method of a seed), distilled on
the same images for the same steps:
  fitnet             plain feature distillation (TrainConfig method "fitnet")
  singer faithful    the default SingerConfig
  singer published   SingerConfig(preset="published")
  scratch            the student trained on the task itself (labels, fit_shapes_task) with the same steps: the floor
and the teacher (its last block) as the ceiling. Probes on each student's own final features (what a deployed
backbone gives), evaluation.probes.evaluate_features on held-out images (seed HELD_OUT_SEED; fit on 75%, scored
on the other 25%): linear image class from CLS and from the mean patch token, cosine kNN (k = 20) on CLS, dense
per-patch class mIoU (background + the four shapes). With --onnx, seed 0's faithful student is also exported to
ONNX and probed through ONNX Runtime (evaluation.study.runner_probe_agreement). --held-out is 2048 images (512
scored): with 512 (128 scored) a probe's own sampling noise (binomial, about 0.04 at 0.4 accuracy) was as large as
the seeds' spread (docs/results.md, "Downstream").

    python benchmarks/downstream.py [--cases 8c,8p,8two,8g,8v,2c,2p,2two,2g,2v] [--seeds 0,1,2] [--steps 600]
                                    [--teacher-steps 3000] [--jobs 2] [--threads 1] [--onnx] [--out DIR]
                                    [--held-out 2048] [--reprobe DIR]

--reprobe DIR probes the students an earlier run saved under its --out DIR (FAMILY/seedN/STUDENT/student/
model.safetensors) instead of distilling them again: the same tables on other held-out images in minutes (the
floor and the teacher are probed again too).

--jobs N runs N worker processes, each taking one family and seed at a time (with --threads threads); on a 2-core CPU
the default `--jobs 2 --threads 1` does the work in about half the time of one two-thread process.

Prints a table per family (mean +- standard deviation over the seeds) and a verdict table: SiNGER faithful minus
FitNet per probe, and whether the difference exceeds the seeds' spread (the larger of the two standard deviations).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from compare_planted import ADAPTER_LR, CASES, LAYERS, _student
from singer_deploy.config import PlantedTraining, SingerConfig, TrainConfig
from singer_deploy.evaluation.probes import evaluate_backbone
from singer_deploy.evaluation.study import probe_columns, runner_probe_agreement
from singer_deploy.models.data import InMemory, SyntheticShapes
from singer_deploy.models.planted_training import fit_shapes_task, planted_teacher
from singer_deploy.models.weights import check_weights_file, read_state_dict
from singer_deploy.train.loop import distill

HELD_OUT_SEED = 7_000_000
# evaluation.study's probe columns (probe_columns, and runner_probe_agreement's rows) and their table headers.
PROBES = {"linear_acc": "linear CLS", "linear_pooled_acc": "linear mean-patch", "knn_acc": "kNN CLS",
          "miou": "dense mIoU"}
STUDENTS = {"fitnet": ("fitnet", None), "singer faithful": ("singer", SingerConfig()),
            "singer published": ("singer", SingerConfig(preset="published"))}
DEFAULT_CASES = "8c,8p,8two,8g,8v,2c,2p,2two,2g,2v"


def probe(backbone, held_out, layer: int, seed: int) -> dict[str, float]:
    columns = probe_columns(evaluate_backbone(backbone, held_out, layer=layer, dense=("class",), seed=seed))
    return {key: columns[key] for key in PROBES}


@functools.cache
def images(share: float, n: int, seed: int) -> InMemory:
    """The SyntheticShapes images of one artifact share, rendered once per process (InMemory)."""
    return InMemory(SyntheticShapes(n, 64, 8, flat_share=share, seed=seed))


@functools.cache
def teacher(key: str, teacher_steps: int):
    """The family's trained planted teacher (from the cache once main() has trained it)."""
    case = CASES[key]
    return planted_teacher(replace(case, training=PlantedTraining(steps=teacher_steps)).planted())


def distilled_students(key: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Probe scores of every distilled student of one family and seed (module docstring)."""
    share, planted = CASES[key].share, teacher(key, args.teacher_steps)
    train_images, held_out = images(share, args.train_images, 0), images(share, args.held_out, HELD_OUT_SEED)
    out = args.out / key / f"seed{seed}"
    train = TrainConfig(steps=args.steps, batch_size=32, lr=3e-3, adapter_lr=ADAPTER_LR, seed=seed,
                        log_every=args.steps, checkpoint_every=args.steps)
    rows, started = {}, time.perf_counter()
    for name, (method, singer) in STUDENTS.items():
        torch.manual_seed(seed)
        if args.reprobe:
            student = saved_student(args.reprobe / key / f"seed{seed}" / name.replace(" ", "-"))
        else:
            student = distill(planted.backbone, _student(), train_images, out / name.replace(" ", "-"),
                              layers=[LAYERS[0]], singer=singer, train=replace(train, method=method),
                              progress=False).student
        rows[name] = probe(student, held_out, -1, seed)
        if args.onnx and name == "singer faithful" and seed == 0:
            for runner in runner_probe_agreement(student, held_out, out / "onnx", formats=("onnx",),
                                                 seed=seed):
                rows[f"singer faithful seed 0, {runner['runner']}"] = {column: runner[column] for column in PROBES}
    print(f"  {CASES[key].label}, seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def saved_student(run_dir: Path):
    """The student a distill() run saved in `run_dir` (its student/model.safetensors)."""
    student = _student()
    student.model.load_state_dict(read_state_dict(check_weights_file(run_dir / "student" / "model.safetensors")))
    return student.eval()


def scratch_student(share: float, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """The floor: the student trained on the task's labels with the teacher recipe's optimiser settings. It depends on
    the images, not on the teacher, so main() trains it once per seed and artifact share."""
    recipe = PlantedTraining(steps=args.teacher_steps)
    torch.manual_seed(seed)
    scratch = _student()
    fit_shapes_task(scratch, SyntheticShapes(args.train_images, 64, 8, flat_share=share, seed=0), steps=args.steps,
                    batch_size=32, lr=recipe.lr, weight_decay=recipe.weight_decay, seed=seed)
    return probe(scratch, images(share, args.held_out, HELD_OUT_SEED), -1, seed)


def teacher_probe(key: str, args: argparse.Namespace) -> dict[str, float]:
    planted = teacher(key, args.teacher_steps)
    return probe(planted.backbone, images(CASES[key].share, args.held_out, HELD_OUT_SEED),
                 planted.config.depth - 1, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600, help="distillation (and scratch) steps of batch 32")
    parser.add_argument("--teacher-steps", type=int, default=3000, help="PlantedTraining steps of the teacher")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--held-out", type=int, default=2048, help="held-out images: probes fit on 75%%, score on 25%%")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, each running one family and seed "
                        "at a time with --threads threads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--onnx", action="store_true", help="also probe seed 0's faithful student through ONNX")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reprobe", type=Path, default=None, help="probe the students an earlier run saved under "
                        "its --out DIR instead of distilling them (module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    keys = args.cases.split(",")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="downstream-"))
    started = time.perf_counter()
    # Teachers one at a time here, so no two workers train the same one; the workers read them from the cache.
    for key in keys:
        teacher(key, args.teacher_steps)
    # Processes, not threads: a 4-block, width-64 student's matrix products are too small to share between cores
    # (docs/results.md, "Downstream"). forkserver: see train/feed.py step_batches on forking a threaded process.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("forkserver"),
                             initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
        students = {(key, seed): pool.submit(distilled_students, key, seed, args) for key in keys for seed in seeds}
        floors = {(share, seed): pool.submit(scratch_student, share, seed, args)
                  for share in dict.fromkeys(CASES[key].share for key in keys) for seed in seeds}
        teachers = {key: pool.submit(teacher_probe, key, args) for key in keys}
        verdicts = []
        for key in keys:
            floor = {seed: floors[CASES[key].share, seed].result() for seed in seeds}
            per_seed = [{**students[key, seed].result(), "scratch (task labels)": floor[seed]} for seed in seeds]
            print(f"\n{CASES[key].label} ({time.perf_counter() - started:.0f} s so far)\n")
            _print_family(teachers[key].result(), per_seed)
            verdicts += _verdicts(CASES[key].label, per_seed)
            print(flush=True)
    print(f"\nSiNGER faithful vs FitNet ({len(seeds)} seeds, {args.steps} steps; spread = the larger standard deviation)\n")
    _print_rows(verdicts)
    print(f"\ntotal {time.perf_counter() - started:.0f} s ({args.jobs} worker process(es) x {args.threads} thread(s))")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _print_family(teacher: dict[str, float], per_seed: list[dict[str, dict[str, float]]]) -> None:
    rows = [{"student": "teacher (last block)", **{PROBES[k]: f"{v:.3f}" for k, v in teacher.items()}}]
    for name in per_seed[0]:
        seeds = [rows_of_seed[name] for rows_of_seed in per_seed if name in rows_of_seed]
        cells = {}
        for key, label in PROBES.items():
            mean, spread = _stats([s[key] for s in seeds])
            cells[label] = f"{mean:.3f} +- {spread:.3f}" if len(seeds) > 1 else f"{mean:.3f}"
        rows.append({"student": name, **cells})
    _print_rows(rows)


def _verdicts(label: str, per_seed: list[dict[str, dict[str, float]]]) -> list[dict[str, str]]:
    rows = []
    for key, name in PROBES.items():
        faithful, fitnet = ([s[student][key] for s in per_seed] for student in ("singer faithful", "fitnet"))
        (mean_s, sd_s), (mean_f, sd_f) = _stats(faithful), _stats(fitnet)
        difference, spread = mean_s - mean_f, max(sd_s, sd_f)
        verdict = "better" if difference > spread else "worse" if difference < -spread else "within spread"
        rows.append({"family": label, "probe": name, "FitNet": f"{mean_f:.3f}", "SiNGER faithful": f"{mean_s:.3f}",
                     "difference": f"{difference:+.3f}", "spread": f"{spread:.3f}", "verdict": verdict})
    return rows


def _print_rows(rows: list[dict[str, str]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
