"""Each distilled layer's artifact subspace, estimated from the blocks that write it (outlier_target "subspace";
docs/method.md, "Faithful refinement").

A refined artifact token should be the raw token with the artifact taken out and everything else kept. Real teachers
write their artifacts in several ways at once: more than one mechanism (content- and position-triggered) in different
blocks along different directions, one artifact built up over several blocks, and a part that varies from token to
token because register-like tokens carry image content. One fixed direction per layer leaves all of that in place.

What we estimate instead, per distilled layer l, from the raw teacher on the first batches of the run:
- the candidate tokens at l (a block 1..l writes them far more than the others: method/selection.py; or, with select_k
  set, raw norm above select_k x the image median) and the others ("normal");
- for every block b <= l, how the block's update x_b - x_{b-1} on the candidate tokens differs from its mean update on
  normal tokens, as an excess second moment (the candidates' spread around the normal mean minus the normal
  tokens' own spread), in units of the normal tokens' update spread at that block, summed over the blocks. Block
  updates rather than the layer's own tokens: the block that writes an artifact adds it plus a small content
  difference, while the layer's tokens carry every content difference accumulated on the way (flat patches have
  content of their own), which tilts the estimate; the artifact is ~10x a normal token, so a tilt of 3 degrees
  already leaves half a normal token behind. Each block in its own units: a part written early, where tokens are
  small, is as large there as a part written late is at its block, and what is left of it at the writer is what the
  later blocks read (LayerNorm scales by the token's whole norm), however small it looks at the layer;
- its eigenvectors whose excess is above EXCESS_LIMIT units, and those above WRITTEN_LIMIT whose excess a block
  writing the former writes (a writer's weaker, token-varying part), at most `max_rank` (the ones that do not fit
  are counted in `left_out`); `select` reads only the former;
- the share of the candidates' excess energy at l the subspace explains, token by token: for each candidate
  token, its squared distance to the normal mean beyond a normal token's (the normal tokens' mean squared
  distance), before and after the subspace is taken out, summed over tokens; never computed on the mean gap, which
  cannot see a part whose mean is zero.

The layer's artifact tokens are then the tokens whose component in the subspace stands out (ArtifactSubspace.select,
method/selection.py). The L_out target of the layer is the teacher's counterfactual: each selected token as the
teacher computes it when every writer's update on it has its component in the subspace set to the normal tokens' mean
update, the other tokens as they are. `explained_share` below `LOW_SHARE` is reported next to the layer's verdict: the
estimate then misses a part of the artifact (more directions than `max_rank`, or a part no block update shows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from singer_deploy.method.metrics import DEFAULT_K, high_norm_mask
from singer_deploy.method.selection import (SELECT_FACTOR, component_ratios, in_band, selection_threshold,
                                             write_outliers)

# A direction joins the subspace when the selected tokens' block updates carry along it more than this excess, in
# units of the normal tokens' update spread at each block, summed over blocks. Measured on the planted families and
# four combinations outside them (docs/method.md, "Artifact subspace"): artifact directions 59-19,800 units; what
# flat patches' content and the blocks after a writer add on artifact tokens at most 2.4.
EXCESS_LIMIT = 10.0
# A direction below EXCESS_LIMIT still joins when its excess is above this and comes mostly (over half of it) from a
# block that writes the directions above the limit: a writer adds its artifact with a weaker part that varies from
# token to token (register-like content), which training can shrink far below the fixed part. Measured (docs/method.md,
# "Artifact subspace"): on the trained image-dependent teacher such parts at 4.0-7.5 units, all at its writer; at the
# writer blocks of the untrained families and combinations nothing above 0.5 once the strong directions are out; on
# the trained 8% grown teacher one direction above the limit, most of it at its last writer, which costs its layer-7
# target 0.007 of cosine to the clean twin; what the blocks after a writer add (not writers) reaches 3.0.
WRITTEN_LIMIT = 2.0
# Below this explained share a layer's estimate is reported as incomplete (run summary, report, distill_config.json).
LOW_SHARE = 0.95
# A block is a writer when it builds at least this share of the selected tokens' component in the subspace (the
# directions above EXCESS_LIMIT) at the layer: its update around the normal mean update, projected on each token's own
# component (over the blocks these shares sum to 1). The counterfactual takes the artifact out of every writer's
# update. Measured (docs/method.md, "Artifact subspace"): writers build 20-100%, the other blocks of untrained planted
# teachers within 0.2% of 0; later blocks of a trained teacher damp the artifact (trained 8% grown: block 7 -8.5%,
# block 6 -3.3%) while holding 2-4% of its update energy, the previous writer rule, which cleaned them too and took
# the layer-7 target from cosine 0.98 to 0.80 to the clean twin. A writer left out would leave its part (5% of a 10x
# artifact is 2.2x a normal token's norm), so the bar is low.
WRITER_SHARE = 0.01
# Selected tokens kept per layer for the per-token shares (the sums use every token), and normal tokens kept per
# layer for the selection threshold.
MAX_TOKENS = 4096
# A layer whose tokens above DEFAULT_K x the image median norm (the literature's artifact cut) make up at least this
# share and are not selected has a high-norm mode the estimate does not treat: said next to the layer's verdict. The
# smallest artifact share the method is asked to handle (0.5%); the planted clean twins have none above 4x.
UNTREATED_SHARE = 0.005
# The counterfactual re-runs every token, not only the selected ones, when the two disagree on the first estimation
# batch by more than this (1 - their mean cosine at the selected tokens): the teacher's other tokens read the artifact
# (docs/method.md, "Artifact subspace"). Measured: untrained planted teachers agree to 1e-4 or better; teachers
# trained with their artifacts differ by 0.03-0.18 at the layers after the writer.
CONTEXT_TOLERANCE = 0.002
# A writer that writes the artifact on patch tokens may write it on prefix tokens (the class token, registers) too;
# every token reads those, so the counterfactual cleans a prefix token at a writer block when its update's component
# in the subspace (around the normal tokens' mean update) is above SELECT_FACTOR times the normal patch tokens' median
# one there, on the first estimation batch (ArtifactSubspace.with_prefix_limits). Measured (docs/method.md, "Artifact
# subspace"): on the planted teachers a class token the writer writes is at 400-1000 times that median, the clean
# twin's class token at most 3.7 times, a normal patch token's 99th percentile 2-3 times.

# What an estimate of None means (the run summary and the log).
NO_CANDIDATES = "no candidate artifact token: no block update stands out (or, with select_k set, no token above it)"


@dataclass(frozen=True)
class ArtifactSubspace:
    """basis: (k, D) orthonormal rows; writers: block -> the share of the selected tokens' component along the
    leading `selection_rank` rows (those above EXCESS_LIMIT) its update builds (blocks at or above WRITER_SHARE);
    explained_share: how much of the selected tokens' excess energy the subspace explains, token by token;
    artifact_tokens / normal_tokens: how many tokens the estimate rests on; update_means: (layer + 1, D) the normal
    tokens' mean update of every block up to the layer; left_out: directions above EXCESS_LIMIT that did not fit
    `max_rank`; layer_mean: (D,) the normal tokens' mean at the layer; threshold: the component ratio above which
    `select` calls a token an artifact (method/selection.py), None under the fixed `select_k` rule; selected_share /
    strength: the share of the estimation batches' patch tokens `select` picks, and their median norm over their
    image's median norm; band_share: the share in the band below the threshold that the losses neither hold nor
    push; untreated_share: the share of tokens above DEFAULT_K x the image median norm that `select` leaves out;
    next_excess: the largest excess (EXCESS_LIMIT's units) of a direction outside the subspace, the margin of the
    choice; selection_rank: the leading basis rows `select` reads (those above EXCESS_LIMIT; None: every row);
    prefix_limits: writer block -> the component of a prefix token's update above which the counterfactual cleans it
    there (with_prefix_limits; empty: prefix tokens are never cleaned); prefix_written: the share of the first
    batch's prefix tokens it cleans."""

    basis: Tensor
    writers: dict[int, float]
    explained_share: float
    artifact_tokens: int
    normal_tokens: int
    update_means: Tensor
    left_out: int = 0
    layer_mean: Tensor | None = None
    threshold: float | None = None
    select_k: float | None = None
    selected_share: float = 0.0
    strength: float = 0.0
    band_share: float = 0.0
    untreated_share: float = 0.0
    whole_context: bool = False
    context_change: float = 0.0
    next_excess: float = 0.0
    selection_rank: int | None = None
    prefix_limits: dict[int, float] = field(default_factory=dict)
    prefix_written: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @torch.no_grad()
    def select(self, tokens: Tensor, medians: Tensor | None = None) -> Tensor:
        """The artifact tokens among raw patch tokens at the layer: their component in the subspace above `threshold`
        (method/selection.py), or, under the fixed rule, their norm above select_k x the image median. tokens: whole
        images (B, N, D) -> (B, N) bool, or any tokens (..., D) with their images' median norms `medians` (...)."""
        return self.token_groups(tokens, medians)[0]

    @torch.no_grad()
    def token_groups(self, tokens: Tensor, medians: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(selected, band), both shaped as `select` returns: the artifact tokens, and the tokens in the band below
        the threshold that the losses neither hold nor push (selection.in_band; none under the fixed rule)."""
        if self.select_k is not None:
            selected = (high_norm_mask(tokens, self.select_k) if medians is None else
                        tokens.norm(dim=-1) > self.select_k * medians)
            return selected, torch.zeros_like(selected)
        if self.layer_mean is None:     # a hand-made subspace without the estimate's facts
            none = torch.zeros(tokens.shape[:-1], dtype=torch.bool, device=tokens.device)
            return none, none
        ratios = component_ratios(tokens, self.layer_mean, self.selection_basis, medians)
        return ratios > self.threshold, in_band(ratios, self.threshold)

    @property
    def selection_basis(self) -> Tensor:
        """The directions `select` reads: those above EXCESS_LIMIT. A writer's weaker part (WRITTEN_LIMIT) is
        taken out by the counterfactual but not read for the selection: it holds little of an artifact token's norm
        and as much of a normal token's content as any direction, so it would only raise the threshold (measured:
        recall 0.959 -> 0.939 on a mixed teacher at 5x; docs/method.md, "Artifact subspace")."""
        return self.basis[:self.selection_rank]

    @property
    def first_block(self) -> int | None:
        """The first block that writes the artifact: where the counterfactual stream starts (None: no writer)."""
        return min(self.writers) if self.writers else None

    def taps_needed(self, layer: int) -> list[int]:
        """Raw taps `counterfactual` reads for `layer`: every block output from the first writer's input on."""
        first = self.first_block
        return [] if first is None else list(range(max(first - 1, 0), layer + 1))

    @torch.no_grad()
    def counterfactual(self, taps: dict[int, Tensor], layer: int, selected: Tensor, run_block,
                       prefix: int) -> Tensor:
        """The layer's tokens (B, prefix + N, D) with each `selected` patch token (B, N) as the teacher computes it
        when its artifact is never written: every writer block's update on the selected tokens, and on the prefix
        tokens a writer writes (`written_prefix`), has its component in the subspace set to the normal tokens' mean
        update, and the blocks after the first writer run on those tokens, so what they would have computed from the
        token's content is there too. The other tokens, prefix tokens included, keep their raw values at the layer
        (the adapters pass prefix tokens as they are). As the context the selected tokens read through attention at
        every block they are the raw teacher's but for the cleaned prefix tokens, or, with `whole_context`, re-run
        too, on the cleaned tokens (a teacher whose other tokens read the artifact; docs/method.md, "Artifact
        subspace"). `run_block(tokens, b, rows)` gives teacher block b's output at `rows` (B, prefix + N) in the
        order of rows.nonzero() (Backbone.run_block_rows); `taps` holds the raw taps `taps_needed(layer)` names."""
        first = self.first_block
        if first is None or not selected.any():    # e.g. a refined stream the layer before cleaned already
            return taps[layer]
        rows = torch.cat([self.written_prefix(taps, prefix).to(selected.device), selected], 1)
        at = rows.nonzero(as_tuple=True)
        run_rows = torch.ones_like(rows) if self.whole_context else rows
        basis = self.basis.to(device=taps[layer].device, dtype=taps[layer].dtype)
        means = self.update_means.to(device=basis.device, dtype=basis.dtype)
        context = taps[first]                                          # (B, prefix + N, D)
        tokens = context[at]                                           # (M, D): the cleaned tokens only
        before = taps[first - 1][at] if first > 0 else torch.zeros_like(tokens)
        # One tensor holds every block's input: a new whole tensor per block was about a third of the
        # counterfactual's time at ViT-L depth (docs/results.md, "The method at the paper's scale").
        inputs = None
        for block in range(first, layer + 1):
            if block > first:
                stream = context if self.whole_context else taps[block - 1]
                inputs = stream.clone() if inputs is None else inputs.copy_(stream)
                output = run_block(inputs.index_put_(at, tokens), block, run_rows)
                if self.whole_context:
                    context = output.reshape(inputs.shape)
                    output = context[at]
                before, tokens = tokens, output
            if block in self.writers:
                tokens = tokens - (tokens - before - means[block]) @ basis.T @ basis
        patch = at[1] >= prefix
        return taps[layer].index_put((at[0][patch], at[1][patch]), tokens[patch])

    def written_prefix(self, taps: dict[int, Tensor], prefix: int) -> Tensor:
        """(B, prefix) bool: the prefix tokens whose update at some writer block has a component in the subspace
        (around the normal tokens' mean update) above that block's `prefix_limits`."""
        stream = taps[self.first_block]
        written = torch.zeros(stream.shape[0], prefix, dtype=torch.bool, device=stream.device)
        for block, limit in self.prefix_limits.items():
            written |= self._update_components(taps, block, slice(0, prefix)) > limit
        return written

    def _update_components(self, taps: dict[int, Tensor], block: int, tokens: slice) -> Tensor:
        """(B, n): the `tokens` of the raw stream, their update at `block` minus the normal tokens' mean update there,
        projected on the subspace: its norm."""
        update = taps[block][:, tokens] - (taps[block - 1][:, tokens] if block > 0 else 0)
        basis = self.basis.to(update)
        return ((update - self.update_means[block].to(update)) @ basis.T).norm(dim=-1)

    @torch.no_grad()
    def with_prefix_limits(self, taps: dict[int, Tensor], layer: int, prefix: int) -> ArtifactSubspace:
        """This estimate with `prefix_limits` measured on raw taps of a few images (`taps_needed(layer)`): at each
        writer block, SELECT_FACTOR times the median component of the normal patch tokens' update there."""
        if not prefix or not self.writers:
            return self
        normal = ~self.select(taps[layer][:, prefix:])
        if not normal.any():
            return self
        patches = slice(prefix, None)
        limits = {block: SELECT_FACTOR * float(self._update_components(taps, block, patches)[normal].median())
                  for block in sorted(self.writers)}
        found = replace(self, prefix_limits=limits)
        return replace(found, prefix_written=float(found.written_prefix(taps, prefix).double().mean()))

    @torch.no_grad()
    def with_context(self, taps: dict[int, Tensor], layer: int, run_block, prefix: int) -> ArtifactSubspace:
        """This estimate with `whole_context` decided on raw taps of a few images (`taps_needed(layer)`): set when
        the counterfactual re-run on every token differs from the one on the selected tokens alone by more than
        CONTEXT_TOLERANCE (1 - mean cosine at the selected tokens)."""
        selected = self.select(taps[layer][:, prefix:])
        if self.first_block is None or not selected.any():
            return self
        rows = torch.cat([torch.zeros_like(selected[:, :1]).expand(-1, prefix), selected], 1)
        alone = self.counterfactual(taps, layer, selected, run_block, prefix)[rows]
        whole = replace(self, whole_context=True).counterfactual(taps, layer, selected, run_block, prefix)[rows]
        change = 1.0 - float(torch.nn.functional.cosine_similarity(alone.float(), whole.float(), dim=-1).mean())
        return replace(self, whole_context=change > CONTEXT_TOLERANCE, context_change=max(change, 0.0))

    @property
    def complete(self) -> bool:
        """No part of the artifact outside the estimate: the candidates' excess explained, every direction within the
        rank, no high-norm mode left unselected (a rank-0 estimate explains nothing and needs nothing)."""
        explained = self.explained_share >= LOW_SHARE or not self.rank
        return explained and not self.left_out and self.untreated_share < UNTREATED_SHARE

    def describe(self) -> str:
        return describe_subspace(self.summary())

    def summary(self) -> dict:
        """JSON-safe facts (distill_config.json, the run summary and the report)."""
        return {"rank": self.rank, "writers": {str(b): round(s, 4) for b, s in sorted(self.writers.items())},
                "explained_share": round(self.explained_share, 4), "left_out": self.left_out,
                "complete": self.complete, "artifact_tokens": self.artifact_tokens, "normal_tokens": self.normal_tokens,
                "untreated_share": round(self.untreated_share, 5), "selection": self.selection_summary(),
                "context": {"whole": self.whole_context, "change": round(self.context_change, 4),
                            "prefix_written": round(self.prefix_written, 4)},
                "next_excess": round(self.next_excess, 3)}

    def selection_summary(self) -> dict:
        """How `select` decides, and what it picked in the estimation batches."""
        rule = ({"rule": "select_k", "select_k": self.select_k} if self.select_k is not None else
                {"rule": "subspace component", "threshold": round(self.threshold, 4)})
        return {**rule, "share": round(self.selected_share, 5), "strength": round(self.strength, 3),
                "band_share": round(self.band_share, 5)}


def describe_subspace(facts: dict) -> str:
    """One line from ArtifactSubspace.summary() (also as read back from distill_config.json)."""
    rank, writers = facts["rank"], facts["writers"]
    blocks = ", ".join(f"{block} ({share:.0%})" for block, share in writers.items()) or "none"
    tokens = f"{facts['artifact_tokens']} candidate / {facts['normal_tokens']} normal tokens"
    if not rank:
        text = (f"no artifact direction: no direction's excess reaches {EXCESS_LIMIT:g} units ({tokens}); nothing "
                "selected")
        return text if facts["complete"] else f"{text}; {incomplete_note(facts)}"
    text = (f"{rank} direction{'s' * (rank != 1)} written by block{'s' * (len(writers) != 1)} {blocks}; explains "
            f"{facts['explained_share']:.1%} of the candidate tokens' excess energy ({tokens})")
    if "selection" in facts:
        text += f"; {describe_selection(facts['selection'])}"
    if facts.get("context", {}).get("whole"):   # absent in runs recorded before the context was decided
        text += "; its target re-runs every token from the first writer on (the other tokens read the artifact)"
    if facts.get("context", {}).get("prefix_written"):
        text += (f"; its target cleans the prefix tokens the writers write too "
                 f"({facts['context']['prefix_written']:.0%} of them on the first batch)")
    return text if facts["complete"] else f"{text}; {incomplete_note(facts)}"


def describe_selection(selection: dict) -> str:
    """ArtifactSubspace.selection_summary() in words."""
    rule = (f"norm above {selection['select_k']:g}x the median (select_k)" if selection["rule"] == "select_k" else
            f"component in the subspace above {selection['threshold']:.3g}x the median norm")
    text = f"selects {selection['share']:.1%} of tokens ({rule}), {selection['strength']:.1f}x the median norm"
    band = selection.get("band_share", 0.0)     # absent in runs recorded before the band existed
    return f"{text}; {band:.1%} in the band below it, held by no term" if band else text


def incomplete_note(facts: dict) -> str:
    """Why an estimate (ArtifactSubspace.summary()) is incomplete: part of the artifact is outside it."""
    left_out = facts.get("left_out", 0)
    reasons = [f"explains only {facts['explained_share']:.0%} of the artifact tokens' excess energy (below "
               f"{LOW_SHARE:.0%})"] if facts["explained_share"] < LOW_SHARE and facts["rank"] else []
    if left_out:
        reasons.append(f"{left_out} more artifact direction{'s' * (left_out != 1)} did not fit the adapter rank "
                       f"{facts['rank']} (raise singer.rank)")
    untreated = facts.get("untreated_share", 0.0)
    if untreated >= UNTREATED_SHARE:
        reasons.append(f"leaves {untreated:.1%} of the tokens above {DEFAULT_K:g}x the median norm unselected (a "
                       "high-norm mode it does not treat: see `singer-deploy scan`, or set singer.select_k)")
    return (f"the estimate {' and '.join(reasons)}: part of the artifact is outside it (docs/method.md, "
            "\"Artifact subspace\")")


class SubspaceEstimator:
    """Running sums over batches of raw taps; `result()` gives each layer's ArtifactSubspace (None when no token of
    that layer was a candidate, e.g. a teacher without artifacts).

    The candidates (the "artifact" side of the sums) are the tokens some block writes far more than the others
    (selection.write_outliers), or, with a fixed `select_k`, the tokens above select_k x the image median norm.
    Kept per layer: one (D, D) second moment of the updates summed over blocks (each block in units of the normal
    tokens' update spread there, measured on the first batch), the normal tokens' (D, D) second moment at the layer,
    (D,) sums per block, up to MAX_TOKENS candidates with their per-block updates and up to MAX_TOKENS normal tokens
    at the layer (float32, on the CPU, each with its image's median norm) for the per-token shares, the writer
    shares and the selection threshold."""

    def __init__(self, layers: Sequence[int], select_k: float | None, num_prefix_tokens: int, *,
                 max_rank: int | None = None):
        self.layers, self.prefix = sorted(layers), int(num_prefix_tokens)
        self.select_k = None if select_k is None else float(select_k)
        self.max_rank = max_rank
        self._sums: dict[tuple, Tensor] = {}
        self._counts = {(layer, kind): 0 for layer in self.layers for kind in ("artifact", "normal")}
        self._kept: dict[int, list[Tensor]] = {layer: [] for layer in self.layers}  # (n, blocks + 2, D)
        self._normal_kept: dict[int, list[Tensor]] = {layer: [] for layer in self.layers}  # (n, D + 1)
        self._units: dict[int, Tensor] = {}      # layer -> (blocks,) normal update spread per block, first batch
        self._generator = torch.Generator().manual_seed(0)

    @property
    def blocks_needed(self) -> list[int]:
        """The taps `add` reads: every block up to the deepest layer."""
        return list(range(max(self.layers) + 1))

    @torch.no_grad()
    def add(self, taps: dict[int, Tensor]) -> None:
        """taps: block -> raw tokens (B, prefix + N, D) for every block in `blocks_needed`."""
        patches = {b: taps[b][:, self.prefix:].float() for b in self.blocks_needed}
        updates = {b: patches[b] if b == 0 else patches[b] - patches[b - 1] for b in self.blocks_needed}
        for layer in self.layers:
            selected = (high_norm_mask(patches[layer], self.select_k) if self.select_k is not None else
                        write_outliers([updates[b] for b in range(layer + 1)], [patches[b] for b in range(layer + 1)]))
            normal = ~selected
            medians = patches[layer].norm(dim=-1).median(dim=1, keepdim=True).values.expand_as(selected)
            self._counts[layer, "artifact"] += int(selected.sum())
            self._counts[layer, "normal"] += int(normal.sum())
            tokens = patches[layer][normal]
            self._add((layer, "normal", "x"), tokens.sum(0))
            self._add((layer, "normal", "xx"), tokens.T @ tokens)
            if layer not in self._units:
                self._units[layer] = torch.stack([_spread(updates[b][normal]) for b in range(layer + 1)])
            for block in range(layer + 1):
                for kind, mask in (("artifact", selected), ("normal", normal)):
                    rows = updates[block][mask]
                    self._add((layer, kind, block), rows.sum(0))
                    # Summed over blocks, each block in its own units.
                    self._add((layer, kind, "uu"), rows.T @ rows / self._units[layer][block])
            room = MAX_TOKENS - sum(len(t) for t in self._kept[layer])
            if room > 0 and selected.any():
                median = medians[selected][:, None].expand(-1, tokens.shape[-1])
                stack = torch.stack([patches[layer][selected]] + [updates[b][selected] for b in range(layer + 1)]
                                    + [median], 1)
                self._kept[layer].append(stack[:room].cpu())
            room = MAX_TOKENS - sum(len(t) for t in self._normal_kept[layer])
            if room > 0:    # a random sample, so every image of the batch is in it
                order = torch.randperm(len(tokens), generator=self._generator)[:room].to(tokens.device)
                self._normal_kept[layer].append(torch.cat([tokens, medians[normal][:, None]], 1)[order].cpu())

    def _add(self, key: tuple, value: Tensor) -> None:
        value = value.double()
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def result(self) -> dict[int, ArtifactSubspace | None]:
        return {layer: self._subspace(layer) for layer in self.layers}

    def _subspace(self, layer: int) -> ArtifactSubspace | None:
        n_a, n_n = self._counts[layer, "artifact"], self._counts[layer, "normal"]
        if not n_n:
            return None
        if not n_a:     # nothing written: a clean teacher, or a high-norm mode no block writes visibly
            return self._without_candidates(layer, n_n)
        sums = {key[1:]: value.cpu() for key, value in self._sums.items() if key[0] == layer}
        blocks = range(layer + 1)
        mean_update = {b: sums["normal", b] / n_n for b in blocks}
        # Excess second moment of the updates: selected tokens around the normal mean, minus the normal spread.
        excess = sums["artifact", "uu"] / n_a - sums["normal", "uu"] / n_n
        units = self._units[layer].double().cpu()
        for b in blocks:
            a_mean = sums["artifact", b] / n_a
            mu = mean_update[b]
            excess -= (torch.outer(a_mean, mu) + torch.outer(mu, a_mean) - 2 * torch.outer(mu, mu)) / units[b]
        mean = sums["normal", "x"] / n_n
        covariance = sums["normal", "xx"] / n_n - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh((excess + excess.T) / 2)
        order = values.argsort(descending=True)
        kept = torch.cat(self._kept[layer]).double()

        def energy(directions: Tensor) -> Tensor:
            """(blocks, k): the kept candidates' update energy around the normal mean update along `directions`
            (D, k), per block."""
            return torch.stack([((kept[:, 1 + b] - mean_update[b]) @ directions).square().sum(0) for b in blocks])

        def built(directions: Tensor) -> Tensor:
            """(blocks,): each block's share of the kept candidates' component along `directions` (D, k) at the
            layer (around the normal mean): its update around the normal mean update, projected on each token's own
            component, over the component's mean norm; summed over the blocks, 1."""
            component = (kept[:, 0] - mean) @ directions
            norm = component.norm(dim=-1, keepdim=True)
            unit = component / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            return torch.stack([(((kept[:, 1 + b] - mean_update[b]) @ directions) * unit).sum(-1).mean()
                                for b in blocks]) / norm.mean().clamp_min(torch.finfo(norm.dtype).tiny)

        found = order[values[order] > EXCESS_LIMIT]
        strong = len(found)
        writers = _writers(built(vectors[:, found]))
        weak = order[(values[order] <= EXCESS_LIMIT) & (values[order] > WRITTEN_LIMIT)]
        if writers and len(weak):   # the weak ones the strong ones' writers write (WRITTEN_LIMIT)
            per_block = energy(vectors[:, weak]) / units[:, None]      # in each block's units, as the excess
            at_writers = per_block[list(writers)].sum(0) / per_block.sum(0).clamp_min(torch.finfo(units.dtype).tiny)
            found = torch.cat([found, weak[at_writers > 0.5]])
        chosen = found[:self.max_rank]
        basis = vectors[:, chosen].T                                    # (k, D), those above the limit first
        share = _explained_share(kept[:, 0] - mean, covariance, basis)
        # The writers are the strong directions' (WRITTEN_LIMIT): a weak one is a writer's part, taken out there;
        # where else it shows, a later block's response to the artifact, the counterfactual's re-run removes it.
        writers = _writers(built(basis[:min(strong, len(chosen))].T))
        updates = torch.stack([mean_update[b] for b in blocks]).float()
        outside = torch.ones_like(values, dtype=torch.bool)
        outside[chosen] = False
        subspace = ArtifactSubspace(basis.float(), writers, share, n_a, n_n, updates,
                                    left_out=len(found) - len(chosen), layer_mean=mean.float(), select_k=self.select_k,
                                    next_excess=float(values[outside].max()) if outside.any() else 0.0,
                                    selection_rank=min(strong, len(chosen)))
        return self._with_selection(subspace, kept[:, [0, -1]], torch.cat(self._normal_kept[layer]).double(), n_a, n_n)

    def _without_candidates(self, layer: int, n_n: int) -> ArtifactSubspace | None:
        """None, or, when tokens above DEFAULT_K x the median make up UNTREATED_SHARE, a rank-0 estimate saying so."""
        normal = torch.cat(self._normal_kept[layer]).double()
        high = float((normal[:, :-1].norm(dim=-1) > DEFAULT_K * normal[:, -1]).double().mean())
        if self.select_k is not None or high < UNTREATED_SHARE:
            return None
        width = normal.shape[1] - 1
        empty = ArtifactSubspace(torch.zeros(0, width), {}, 0.0, 0, n_n, torch.zeros(layer + 1, width),
                                 layer_mean=normal[:, :-1].mean(0).float())
        return replace(empty, threshold=selection_threshold(normal.new_zeros(0)), untreated_share=high)

    def _with_selection(self, found: ArtifactSubspace, candidates: Tensor, normal: Tensor, n_a: int,
                        n_n: int) -> ArtifactSubspace:
        """The selection threshold from the kept normal tokens (rows: D values, then the image median norm), and the
        share and strength `select` gives on the kept tokens, each side weighted by its count."""
        groups = [(candidates[:, 0], candidates[:, 1, 0], n_a), (normal[:, :-1], normal[:, -1], n_n)]
        threshold = None
        if self.select_k is None:
            threshold = selection_threshold(component_ratios(normal[:, :-1], found.layer_mean, found.selection_basis,
                                                             normal[:, -1]))
        found = replace(found, threshold=threshold)
        picked_share, band_share, untreated, picked_norms = 0.0, 0.0, 0.0, []
        for tokens, medians, count in groups:
            norms = tokens.norm(dim=-1) / medians.clamp_min(torch.finfo(tokens.dtype).tiny)
            picked, band = found.token_groups(tokens, medians)
            picked_share += count * float(picked.double().mean()) / (n_a + n_n)
            band_share += count * float(band.double().mean()) / (n_a + n_n)
            untreated += count * float(((norms > DEFAULT_K) & ~picked).double().mean()) / (n_a + n_n)
            picked_norms.append(norms[picked])
        norms = torch.cat(picked_norms)
        strength = float(norms.median()) if len(norms) else 0.0
        return replace(found, selected_share=picked_share, strength=strength, band_share=band_share,
                       untreated_share=untreated)


def _writers(built: Tensor) -> dict[int, float]:
    """block -> the share of the artifact component it builds, `built` (blocks,), for the blocks at or above
    WRITER_SHARE."""
    return {b: s for b, s in enumerate(built.tolist()) if s >= WRITER_SHARE}


def _spread(rows: Tensor) -> Tensor:
    """Mean squared distance of the rows (n, D) to their mean: one unit of a block's update (never 0)."""
    spread = (rows - rows.mean(0)).square().sum(-1).mean() if len(rows) else rows.new_zeros(())
    return spread.clamp_min(torch.finfo(rows.dtype).tiny)


def _explained_share(centred: Tensor, covariance: Tensor, basis: Tensor) -> float:
    """1 - (excess energy left once the subspace is taken out) / (excess energy before), summed over the selected
    tokens `centred` (minus the normal mean); a token's excess is its squared distance to the normal mean beyond a
    normal token's mean one, clipped at 0 token by token."""
    typical = torch.trace(covariance)
    before = (centred.square().sum(-1) - typical).clamp_min(0)
    kept = centred - (centred @ basis.T) @ basis
    after = (kept.square().sum(-1) - typical + torch.trace(basis @ covariance @ basis.T)).clamp_min(0)
    total = before.sum()
    return float(1.0 - after.sum() / total) if total > 0 else 1.0


@torch.no_grad()
def estimate_artifact_subspaces(teacher, batches, layers: Sequence[int], select_k: float,
                                max_rank: int | None = None) -> dict[int, ArtifactSubspace | None]:
    """Each distilled layer's ArtifactSubspace from raw teacher taps of `batches` (iterable of image tensors), its
    counterfactual's prefix limits and context decided on the first batch (ArtifactSubspace.with_prefix_limits,
    with_context); `teacher` is a lead
    Backbone (forward_taps, run_block_rows, num_prefix_tokens); `max_rank` caps the directions (the adapter rank: a
    linear adapter of rank r cannot remove more than r)."""
    estimator = SubspaceEstimator(layers, select_k, teacher.num_prefix_tokens, max_rank=max_rank)
    first = None
    for images in batches:
        first = images if first is None else first
        estimator.add(teacher.forward_taps(images, estimator.blocks_needed))
    found = estimator.result()
    if first is None:
        return found
    taps = teacher.forward_taps(first, estimator.blocks_needed)
    p = teacher.num_prefix_tokens
    return {layer: subspace if subspace is None else
            subspace.with_prefix_limits(taps, layer, p).with_context(taps, layer, teacher.run_block_rows, p)
            for layer, subspace in found.items()}


def subspace_loss(patches: Tensor, target: Tensor, selected: Tensor, held: Tensor | None = None) -> Tensor:
    """The refined layer held to the teacher's counterfactual (ArtifactSubspace.counterfactual): the mean of
    ||F_hat - T||^2 / ||T||^2 over the selected tokens plus the same mean over the `held` tokens (default: every
    other token; ArtifactSubspace.token_groups' band is in neither group).

    The two groups are averaged apart so a 2% artifact cluster is not outweighed. The normal tokens are held here,
    directly, because the next block alone does not hold them: a reader block can cancel most of a change along the
    directions it responds to (docs/method.md, "Faithful refinement"). Relative, so no image or layer dominates by
    scale. A group with no token adds zero, with a graph."""
    with torch.autocast(device_type=patches.device.type, enabled=False):
        target = target.float()
        error = (patches.float() - target).square().sum(-1) / target.square().sum(-1).clamp_min(
            torch.finfo(torch.float32).tiny)
        held = ~selected if held is None else held
        return sum((error * mask).sum() / mask.sum().clamp_min(1)
                   for mask in (selected.to(error.dtype), held.to(error.dtype)))
