"""Near-nullspace of a block's FFN: the directions the next teacher block barely reads.

SiNGER initialises each refinement adapter with W_d = N^T, W_u = N, where the rows of N span input directions that a
linear surrogate of the FFN nearly annihilates. The surrogate is M = (fc2.weight @ fc1.weight)^T (d x d) in the row
convention x -> x M, ignoring norms, activation, biases and LayerScale (docs/method.md, "Nullspace initialisation").
Its LEFT singular vectors u_i satisfy ||u_i^T M|| = sigma_i, so small sigma_i means "the FFN ignores this direction".
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from timm.layers.mlp import GluMlp
from torch import Tensor, nn

from singer_deploy.config import NULLSPACE_RULES
from singer_deploy.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Above this share of the width below tau, the "official" rule's first-r pick is the largest sigmas, not a nullspace.
TRAP_SHARE = 0.5


@dataclass(frozen=True)
class NullspaceBasis:
    """A selected basis and what was measured while selecting it.

    basis: (r, d) float64 with orthonormal rows (padding rows included).
    sigmas: (r,) float64 gain ||n M|| of each row: its singular value for SVD rows, the measured gain for padding.
    k: number of singular values below tau (logged per layer; the paper never reports it).
    num_padded: random rows appended at the end (only the "official" rule pads).
    """

    basis: Tensor
    sigmas: Tensor
    k: int
    rule: str
    tau: float
    num_padded: int

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])


def surrogate_matrix(module: nn.Module) -> Tensor:
    """M = (fc2.weight @ W_value)^T in float64 for a timm block (uses `.mlp`) or an MLP module itself.

    Plain MLP (timm `Mlp`): W_value = fc1.weight. Gated MLPs, act(W_g x) * (W_x x): W_value = the VALUE branch
    (timm `SwiGLU.fc1_x`; for a fused `GluMlp`/`SwiGLUPacked` fc1 the half that is not passed through the activation).
    Why: holding the gate fixed, the only linear path from the input to fc2 is the value branch, so a direction
    that fc2 @ W_value annihilates is dropped whatever the gate does. Other MLP types raise ModelError.
    """
    mlp = module.mlp if hasattr(module, "mlp") else module
    fc2 = getattr(mlp, "fc2", None)
    if not isinstance(fc2, nn.Linear):
        raise _unknown_mlp(mlp)
    if isinstance(getattr(mlp, "fc1_x", None), nn.Linear):
        value = mlp.fc1_x.weight
    elif isinstance(mlp, GluMlp) and isinstance(mlp.fc1, nn.Linear):
        first, second = mlp.fc1.weight.chunk(2, dim=0)
        # gate_last: x1 * act(x2) -> the value is the first half; otherwise act(x1) * x2 -> the second half.
        value = first if mlp.gate_last else second
    elif isinstance(getattr(mlp, "fc1", None), nn.Linear) and mlp.fc1.out_features == fc2.in_features:
        value = mlp.fc1.weight
    else:
        raise _unknown_mlp(mlp)
    if value.shape[0] != fc2.in_features or value.shape[1] != fc2.out_features:
        raise ModelError("The MLP does not map the embedding width back onto itself",
                         expected="fc1: d -> h and fc2: h -> d", found=f"value {tuple(value.shape)}, "
                         f"fc2 {tuple(fc2.weight.shape)}", fix="SiNGER needs a residual MLP of width d -> d")
    with torch.no_grad():
        return (fc2.weight.detach().double().cpu() @ value.detach().double().cpu()).T


def nullspace_basis(matrix: Tensor, rank: int, *, rule: str = "smallest", tau: float = 0.05, seed: int = 0,
                    label: str = "matrix") -> NullspaceBasis:
    """Select r near-null left singular directions of a d x d surrogate matrix (SVD in float64).

    "smallest": the r directions with the smallest singular values (paper text).
    "official": the singular values below the absolute threshold tau, in SVD (descending) order, first r kept,
    i.e. the LARGEST below tau (reference code); when fewer than r qualify, seeded random unit rows orthogonalised
    against the rest pad the basis (the reference code pads with non-orthogonal unseeded rows).
    """
    d = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != d:
        raise ModelError("The surrogate matrix must be square", expected="(d, d)", found=str(tuple(matrix.shape)),
                         fix="build it with surrogate_matrix(block)")
    if rule not in NULLSPACE_RULES:
        raise ConfigError("Unknown nullspace rule", expected=" or ".join(map(repr, NULLSPACE_RULES)),
                          found=repr(rule), fix="use rule='smallest'")
    if not 1 <= rank <= d:
        raise ConfigError(f"The adapter rank does not fit the width of {label}", expected=f"1 <= rank <= {d}",
                          found=str(rank), fix=f"set rank <= {d} (published: 64 for width 1024)")
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=True)
    below = torch.nonzero(s < tau).flatten()
    k = int(below.numel())
    if rule == "smallest":
        index = torch.arange(d - 1, d - 1 - rank, -1)        # most null first
    else:
        index = below[:rank]
        _warn_official(label, k, rank, d, tau)
    chosen = u[:, index].T
    num_padded = rank - chosen.shape[0]
    if num_padded:
        chosen = torch.cat([chosen, _orthogonal_padding(chosen, num_padded, seed)])
    sigmas = (chosen @ matrix.double()).norm(dim=1)
    log.info("nullspace %s: rule=%s d=%d r=%d tau=%g k=%d padded=%d selected sigma %.3g..%.3g (all %.3g..%.3g)",
             label, rule, d, rank, tau, k, num_padded, sigmas.min(), sigmas.max(), s.min(), s.max())
    return NullspaceBasis(basis=chosen, sigmas=sigmas, k=k, rule=rule, tau=tau, num_padded=num_padded)


def block_nullspace(block: nn.Module, rank: int, *, rule: str = "smallest", tau: float = 0.05, seed: int = 0,
                    label: str = "block") -> NullspaceBasis:
    """Nullspace basis of one block's FFN surrogate (pass block l+1 for layer l, the block itself for the last)."""
    return nullspace_basis(surrogate_matrix(block), rank, rule=rule, tau=tau, seed=seed, label=label)


def _orthogonal_padding(rows: Tensor, count: int, seed: int) -> Tensor:
    """`count` seeded random unit rows orthonormal to each other and to `rows` (orthonormal, (k, d))."""
    d = rows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(d, count, generator=generator, dtype=torch.float64)
    noise = noise - rows.T @ (rows @ noise)               # remove the part inside span(rows)
    q, _ = torch.linalg.qr(noise)
    return q.T


def _warn_official(label: str, k: int, rank: int, d: int, tau: float) -> None:
    if k == 0:
        warnings.warn(f"nullspace {label}: no singular value is below tau={tau:g}; the official rule uses a fully "
                      f"random basis of {rank} rows. Use rule='smallest' or a larger tau.", stacklevel=3)
    elif k < rank:
        warnings.warn(f"nullspace {label}: only {k} of {d} singular values are below tau={tau:g}; padding with "
                      f"{rank - k} random orthogonal rows (official rule).", stacklevel=3)
    if k > TRAP_SHARE * d and k > rank:
        warnings.warn(f"nullspace {label}: {k} of {d} singular values are below tau={tau:g}. The absolute threshold "
                      "is below most singular values; the official rule then picks the largest ones (the opposite "
                      "of a nullspace). Use rule='smallest'.", stacklevel=3)


def _unknown_mlp(mlp: nn.Module) -> ModelError:
    return ModelError("Unsupported MLP type for the FFN surrogate",
                      expected="timm Mlp (fc1, fc2), SwiGLU (fc1_g, fc1_x, fc2) or GluMlp/SwiGLUPacked (fused fc1)",
                      found=type(mlp).__name__,
                      fix="use a teacher whose blocks have a standard timm MLP, or extend surrogate_matrix")


def surrogate_block(layer: int, depth: int) -> int:
    """The block that reads layer `layer`: the next one, or the layer's own block for the teacher's last block.

    Its FFN is the nullspace surrogate of the layer (Refiner.from_teacher), and its output on the layer is the
    next-block reading the metrics report (evaluation.analysis)."""
    return layer + 1 if layer + 1 < depth else layer
