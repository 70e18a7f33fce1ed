"""Phase 3.1, where refusal flows: the residual stream x position and the attention and MLP
outputs x layer, patched in both directions (denoising and noising) with the next-token KL.

Clean = a harmful train prompt, corrupted = its harmless analogue; the metric is the
refusal score and effects are normalized (0 = the unpatched run, 1 = the source run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import harmful, harmless, metric_for, patch_spec, positions_label
from instruments import patching
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult

N_POSITIONS = 6  # the residual stream is patched at the last 6 positions (the chat template's closing tokens)
DIRECTIONS = ("denoising", "noising")
KINDS = ("resid", "attn_out", "mlp_out")


@dataclass(frozen=True, kw_only=True)
class LayerPatching:
    """Each direction's residual (layer x position), attention-output and MLP-output (layer) sweeps."""

    results: dict[str, dict[str, PatchResult]]  # direction -> kind -> result
    pairs: tuple[Pair, ...]
    position_labels: tuple[str, ...]  # the last N_POSITIONS tokens of the first harmful prompt
    block_positions: str  # where the attention and MLP outputs were patched

    def record(self) -> records.LayerPatching:
        def effect(kind: str) -> dict:
            return {direction: self.results[direction][kind].normalized.float() for direction in DIRECTIONS}

        def kl(kind: str) -> dict:
            return {direction: self.results[direction][kind].kl.mean(-1).float() for direction in DIRECTIONS}

        return records.LayerPatching(
            positions=list(range(-N_POSITIONS, 0)), position_labels=list(self.position_labels),
            n_pairs=len(self.pairs), block_positions=self.block_positions,
            metric="refusal score (log-odds of the refusal tokens)", resid=effect("resid"), resid_kl=kl("resid"),
            attn_out=effect("attn_out"), attn_out_kl=kl("attn_out"), mlp_out=effect("mlp_out"),
            mlp_out_kl=kl("mlp_out"), prompts=harmful(self.pairs))


def layer_patching(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
                   window: int | None) -> LayerPatching:
    metric, bad, good = metric_for(tokens), harmful(pairs), harmless(pairs)
    results = {}
    for direction in DIRECTIONS:
        spec = patch_spec(handle, cfg, direction=direction, kl=True)
        results[direction] = {
            "resid": patching.patch_resid(handle, bad, good, metric, spec, n_positions=N_POSITIONS),
            "attn_out": patching.patch_attn_out(handle, bad, good, metric, spec),
            "mlp_out": patching.patch_mlp_out(handle, bad, good, metric, spec)}
    ids, _ = handle.encode([pairs[0].harmful])
    labels = tuple(handle.tokenizer.decode([t]) for t in ids[0, -N_POSITIONS:].tolist())
    return LayerPatching(results=results, pairs=tuple(pairs), position_labels=labels,
                         block_positions=positions_label(window))
