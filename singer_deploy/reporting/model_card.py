"""The student's model card: `<run>/student/README.md`, next to timm's config.json + model.safetensors.

It says what the student is (architecture, how to load it, which features were distilled), how it was made
(teacher, layers, method and its settings, data, training) and how it measured (artifact metrics per source,
probes on labelled held-out images, parity per exported artifact, latency), all taken from the run's own records;
a part that did not run says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from singer_deploy.export.bench import markdown_table
from singer_deploy.io import atomic_write_text

CARD_NAME = "README.md"
_PARITY_COLUMNS = ["candidate", "precision", "output", "token_cos_min", "image_cos_min", "max_abs_rel", "rel_err_p99",
                   "knn_overlap", "passed"]
_PROBE_COLUMNS = ["model", "features", "linear_acc", "linear_pooled_acc", "knn_acc", "miou"]
_LATENCY_COLUMNS = ["runner", "p50_ms", "p90_ms", "throughput_ips", "size_mb", "speedup_vs_pytorch/fp32"]


def write_model_card(student_dir: str | Path, *, config: Mapping[str, Any], summary: Mapping[str, Any],
                     distill_config: Mapping[str, Any], parity: Sequence[Mapping[str, Any]] = (),
                     latency: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write `student_dir/README.md` from a run's config (RunConfig.to_dict()), summary, distill_config.json,
    parity rows and latency rows; returns its path."""
    student_dir = Path(student_dir)
    return atomic_write_text(student_dir / CARD_NAME, model_card(student_dir, config=config, summary=summary,
                                                                  distill_config=distill_config, parity=parity,
                                                                  latency=latency))


def model_card(student_dir: Path, *, config: Mapping[str, Any], summary: Mapping[str, Any],
               distill_config: Mapping[str, Any], parity: Sequence[Mapping[str, Any]] = (),
               latency: Sequence[Mapping[str, Any]] = ()) -> str:
    teacher, student, data, train = config["teacher"], config["student"], config["data"], config["train"]
    method = summary.get("method", train.get("method"))
    teacher_from = teacher.get("weights") or ("the local timm/Hugging Face cache" if teacher.get("pretrained")
                                              else "its hub folder" if ":" in teacher["name"] else "random init")
    lines = [
        "---", "library_name: timm", "tags: [image-feature-extraction, timm, knowledge-distillation, singer-deploy]",
        "---", "",
        f"# {student['name']} distilled from {teacher['name']} ({method})", "",
        "Load it (no network needed):", "", "```python", "import timm", "",
        f'model = timm.create_model("local-dir:{student_dir}", pretrained=True)',
        "patch_tokens = model.forward_intermediates(images, indices=[-1], norm=False, output_fmt=\"NLC\",",
        "                                           intermediates_only=True)[0]   # (B, N, D)",
        "```", "",
        "The distilled features are the student's last-block tokens before the final norm (what the exported ONNX / "
        "OpenVINO / TensorRT artifacts return as `patch_tokens` and `cls`). The projector into the teacher's "
        "feature space is `projectors.safetensors` in the run directory.", "",
        "## How it was made", "",
        f"- Teacher: `{teacher['name']}`, weights from {teacher_from}",
        f"- Student: `{student['name']}` {_kwargs(student.get('kwargs'))}".rstrip(),
        f"- Layers (teacher -> student): {distill_config.get('teacher_layers')} -> "
        f"{distill_config.get('student_layers')}",
        f"- Method: {method}" + (f" ({_singer_settings(distill_config.get('singer', {}))})"
                                 if method == "singer" else " (plain feature MSE, no refinement)"),
        f"- Data: {_data(data)}",
        f"- Training: {train['steps']} steps, batch {train['batch_size']}, {train['optimizer']} lr {train['lr']}, "
        f"{train['schedule']} schedule, seed {train['seed']}, {summary.get('distill_seconds', '?')} s", "",
        "## Artifact metrics (held-out images)", "",
        *_artifact_lines(summary.get("artifacts")), "",
        "## Probes (held-out images)", "",
        *_probe_lines(summary.get("probes")), "",
        "## Parity of the exported artifacts against eager PyTorch", "",
        markdown_table(list(parity), _PARITY_COLUMNS, digits=6) if parity else "Not run (no export in this run).", "",
        *_runner_option_lines(summary.get("runner options")),
        "## Latency", "",
        markdown_table(list(latency), _LATENCY_COLUMNS) if latency else "Not run (no benchmark in this run).", "",
        "Latency depends on the machine and its load; re-measure with `singer-deploy bench RUN_DIR`.", "",
    ]
    return "\n".join(lines)


def _runner_option_lines(options: Mapping[str, str] | None) -> list[str]:
    """How each shipped artifact was gated and timed (e.g. an OpenVINO IR's inference precision hint): `verify` and
    the golden_check fixture run it the same way; a deployment should too."""
    if not options:
        return []
    return ["Run each shipped artifact as it was gated and timed (`singer-deploy verify` does):", "",
            *[f"- {key}: {setting}" for key, setting in options.items()], ""]


def _kwargs(kwargs: Mapping[str, Any] | None) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else ""


def _singer_settings(singer: Mapping[str, Any]) -> str:
    keys = ("preset", "rank", "tau", "rule", "alpha", "outlier_target", "select_k", "info_tokens", "adapter_init",
            "w_kd", "w_out", "w_info", "info_variant", "last_block_info")
    shown = {**singer, "select_k": "from the data" if singer.get("select_k") is None else singer["select_k"]}
    return ", ".join(f"{k} {shown[k]}" for k in keys if k in singer)


def _data(data: Mapping[str, Any]) -> str:
    if data["source"] == "synthetic":
        return f"synthetic shapes ({data['n']} training images, {data['eval_n']} held out)"
    return f"images from `{data['source']}` ({data['eval_n']} held out for evaluation)"


def _probe_lines(probes: Mapping[str, Any] | str | None) -> list[str]:
    """The run's probe table (evaluation/probe_table.py), or why there is none."""
    if not isinstance(probes, Mapping):
        return [f"Not run ({probes or 'no probes in this run'})."]
    columns = [key for key in _PROBE_COLUMNS if key in probes["rows"][0]]
    return [f"What the features know about the labels: probes fitted on {probes['n_train']} and scored on "
            f"{probes['n_test']} held-out images, {probes['classes']} classes (chance {probes['chance']:.3f}); linear "
            "and kNN: accuracy on the class token (pooled: mean patch token); miou: dense per-patch probe.", "",
            markdown_table(list(probes["rows"]), columns)]


def _artifact_lines(artifacts: Mapping[str, Any] | None) -> list[str]:
    """One table row per source (raw teacher, refined teacher, student ...), one column per metric."""
    if not artifacts:
        return ["Not measured."]
    metrics = {k: v for k, v in artifacts.items() if isinstance(v, Mapping)}
    sources = list(dict.fromkeys(source for values in metrics.values() for source in values))
    rows = [{"source": source, **{metric: values.get(source) for metric, values in metrics.items()}}
            for source in sources]
    where = f"Layer {artifacts['layer']}. " if "layer" in artifacts else ""
    return [f"{where}HNR_4: share of patch tokens whose norm exceeds 4x the image median; E_out: share of the "
            "squared token norms held by those tokens (singer_deploy/method/metrics.py).", "",
            markdown_table(rows, ["source", *metrics])]
