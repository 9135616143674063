"""Feature-space parity between a reference (eager PyTorch) and an exported artifact, gated per precision.

A distilled student is judged on its embeddings, so besides tensor error we report what downstream users feel:
per-token and per-image cosine distributions, kNN@k neighbour overlap across the batch, and agreement of the
token-norm map (where high-norm artifact tokens show up). Thresholds live in one policy per precision
(ParityPolicy and PRECISION_GATES in singer_deploy/config.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from singer_deploy.config import ParityPolicy, normalize_precision
from singer_deploy.errors import ParityError

_TINY = 1e-30


@dataclass
class Check:
    metric: str
    value: float | None
    op: str            # ">=" or "<="
    threshold: float
    passed: bool


@dataclass
class OutputParity:
    name: str
    shape: tuple[int, ...]
    metrics: dict[str, float | None]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass
class ParityReport:
    precision: str
    policy: ParityPolicy
    outputs: dict[str, OutputParity]
    problems: list[str] = field(default_factory=list)   # structural failures: missing output, shape mismatch
    reference: str = "torch"
    candidate: str = "artifact"
    notes: dict = field(default_factory=dict)           # e.g. environment differences against a golden bundle

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs.values())

    def failures(self) -> list[str]:
        found = list(self.problems)
        for out in self.outputs.values():
            found += [f"{out.name}.{c.metric}={_fmt(c.value)} (needs {c.op} {c.threshold:g})"
                      for c in out.checks if not c.passed]
        return found

    def table_rows(self) -> list[dict]:
        """One row per output, the numbers a report table shows."""
        keys = ("max_abs", "max_abs_rel", "rel_err_p99", "token_cos_min", "token_cos_p1", "image_cos_min",
                "knn_overlap", "norm_corr", "norm_rel_err_max", "nonfinite")
        return [{"candidate": self.candidate, "precision": self.precision, "output": o.name,
                 **{k: o.metrics.get(k) for k in keys}, "passed": o.passed} for o in self.outputs.values()]

    def to_dict(self) -> dict:
        return {"precision": self.precision, "reference": self.reference, "candidate": self.candidate,
                "passed": self.passed, "policy": self.policy.to_dict(), "problems": list(self.problems),
                "failures": self.failures(), "notes": self.notes,
                "outputs": {name: {"shape": list(o.shape), "passed": o.passed, "metrics": o.metrics,
                                   "checks": [dataclasses.asdict(c) for c in o.checks]}
                            for name, o in self.outputs.items()}}

    def markdown(self) -> str:
        rows = self.table_rows()
        cols = ["output", "max_abs_rel", "rel_err_p99", "token_cos_min", "image_cos_min", "knn_overlap",
                "norm_corr", "nonfinite", "passed"]
        lines = [f"{self.candidate} vs {self.reference} ({self.precision}): {'PASS' if self.passed else 'FAIL'}",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
        lines += [f"- {p}" for p in self.failures()]
        return "\n".join(lines)

    def raise_if_failed(self) -> "ParityReport":
        if not self.passed:
            raise ParityError(f"{self.candidate} fails the {self.precision} parity gate against {self.reference}",
                              report=self.to_dict(), expected="every gate of the policy met",
                              found="; ".join(self.failures()),
                              fix="inspect report.to_dict(); for reduced precision keep LayerNorm/Softmax in FP32 "
                                  "or loosen the policy only with measured justification")
        return self


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (M, D) float64 arrays; two all-zero rows count as identical."""
    num = np.sum(a * b, axis=-1)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = num / np.maximum(na * nb, _TINY)
    both_zero = (na < _TINY) & (nb < _TINY)
    return np.where(both_zero, 1.0, cos)


def _knn_overlap(ref_feats: np.ndarray, cand_feats: np.ndarray, k: int) -> float | None:
    """Mean overlap of each image's k nearest neighbours (cosine) under reference vs candidate features."""
    n = ref_feats.shape[0]
    k = min(k, n - 1)
    if k < 2:   # with 1 neighbour or none the overlap says nothing about the embedding geometry
        return None

    def neighbours(feats: np.ndarray) -> np.ndarray:
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), _TINY)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ref_nn, cand_nn = neighbours(ref_feats), neighbours(cand_feats)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref_nn, cand_nn)]))


def _output_metrics(ref: np.ndarray, cand: np.ndarray, k: int, flat_cv: float) -> dict[str, float | None]:
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(c)
    nonfinite = int(finite.size - finite.sum())
    c = np.where(finite, c, 0.0)
    diff = np.abs(r - c)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    tokens_r = r.reshape(-1, r.shape[-1]) if r.ndim >= 2 else r.reshape(-1, 1)
    tokens_c = c.reshape(tokens_r.shape)
    token_cos = _cosines(tokens_r, tokens_c)
    images_r, images_c = r.reshape(r.shape[0], -1), c.reshape(c.shape[0], -1)
    image_cos = _cosines(images_r, images_c)
    norm_r = np.linalg.norm(tokens_r, axis=-1)
    norm_c = np.linalg.norm(tokens_c, axis=-1)
    rel_tok = np.linalg.norm(tokens_r - tokens_c, axis=-1) / np.maximum(norm_r, _TINY)
    metrics: dict[str, float | None] = {
        "scale": scale, "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_abs_rel": float(diff.max() / scale) if scale > 0 else float(diff.max() if diff.size else 0.0),
        "rel_err_p99": float(np.quantile(rel_tok, 0.99)),
        "token_cos_min": float(token_cos.min()), "token_cos_p1": float(np.quantile(token_cos, 0.01)),
        "token_cos_mean": float(token_cos.mean()),
        "image_cos_min": float(image_cos.min()), "image_cos_p1": float(np.quantile(image_cos, 0.01)),
        "image_cos_mean": float(image_cos.mean()),
        "nonfinite": nonfinite, "knn_overlap": None, "norm_corr": None, "norm_rel_err_max": None,
    }
    if r.ndim == 3:   # token maps (B, N, D): norm-map agreement; image features are the mean token
        metrics["norm_rel_err_max"] = float(np.max(np.abs(norm_c - norm_r) / np.maximum(norm_r, _TINY)))
        cv = float(norm_r.std() / max(norm_r.mean(), _TINY))
        if cv >= flat_cv and norm_c.std() > 0:
            metrics["norm_corr"] = float(np.corrcoef(norm_r, norm_c)[0, 1])
        feats_r, feats_c = r.mean(axis=1), c.mean(axis=1)
    else:
        feats_r, feats_c = images_r, images_c
    metrics["knn_overlap"] = _knn_overlap(feats_r, feats_c, k)
    return metrics


def _gate(metrics: dict, policy: ParityPolicy) -> list[Check]:
    checks = [Check("nonfinite", metrics["nonfinite"], "<=", 0, metrics["nonfinite"] == 0)]
    gates = [("max_abs_rel", "<=", policy.max_abs_rel), ("rel_err_p99", "<=", policy.rel_err_p99),
             ("token_cos_min", ">=", policy.token_cos_min), ("image_cos_min", ">=", policy.image_cos_min),
             ("knn_overlap", ">=", policy.knn_overlap_min), ("norm_corr", ">=", policy.norm_corr_min),
             ("norm_rel_err_max", "<=", policy.norm_rel_err_max)]
    for metric, op, threshold in gates:
        value = metrics.get(metric)
        if threshold is None or value is None:   # not gated by policy, or not defined for this output
            continue
        ok = (value >= threshold) if op == ">=" else (value <= threshold)
        checks.append(Check(metric, value, op, threshold, bool(ok and not math.isnan(value))))
    return checks


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str,
                    policy: ParityPolicy | None = None, *, reference_name: str = "torch",
                    candidate_name: str = "artifact") -> ParityReport:
    """Compare every reference output with the candidate's output of the same name under `policy`."""
    precision = normalize_precision(precision)
    policy = policy or ParityPolicy.for_precision(precision)
    report = ParityReport(precision, policy, {}, reference=reference_name, candidate=candidate_name)
    for name, ref in reference.items():
        if name not in candidate:
            report.problems.append(f"output {name!r} missing from {candidate_name} (has {sorted(candidate)})")
            continue
        cand = np.asarray(candidate[name])
        ref = np.asarray(ref)
        if cand.shape != ref.shape:
            report.problems.append(f"output {name!r} shape {cand.shape} != reference {ref.shape}")
            continue
        metrics = _output_metrics(ref, cand, policy.knn_k, policy.flat_norm_cv)
        report.outputs[name] = OutputParity(name, tuple(ref.shape), metrics, _gate(metrics, policy))
    if not reference:
        report.problems.append("the reference has no outputs to compare")
    return report
