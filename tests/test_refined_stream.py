"""The refined stream (docs/method.md, "Refined stream") on a planted teacher whose other tokens read the artifact."""

from __future__ import annotations

import torch

from singer_deploy.config import PlantedConfig
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.method.metrics import token_cosines
from singer_deploy.method.refine import RefinedTeacher, Refiner
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted_training import planted_teacher

LAYERS = (4, 7)


def test_a_deeper_layer_read_from_the_refined_stream_is_closer_to_the_clean_twin():
    """Attention values that read the artifact (value_null off) carry it into the other tokens of the blocks after
    the writer. At the adapters' "subspace" start (no training), layer 7 read from the refined layer 4 is closer to the
    clean twin than layer 7 refined from its raw tokens, on the artifact tokens and on the others."""
    planted = planted_teacher(PlantedConfig(position_share=0.08, value_null=False))
    teacher, config = planted.backbone, planted.config

    def images(n: int, seed: int) -> torch.Tensor:
        return stack_images(SyntheticShapes(n, config.img_size, config.patch_size, flat_share=0.08, seed=seed))

    subspaces = estimate_artifact_subspaces(teacher, images(64, 0).split(32), LAYERS, None, max_rank=8)
    held_out = images(32, 1)
    artifacts = torch.stack(list(planted.cluster_masks(held_out).values())).any(0)
    p = teacher.num_prefix_tokens
    twin = planted.clean.forward_taps(held_out, [LAYERS[-1]])[LAYERS[-1]][:, p:]
    cosines = {}
    for stream in ("raw", "refined"):
        refiner = Refiner.from_teacher(teacher, LAYERS, rank=8, init="subspace", stream=stream)
        refiner.start_at_subspaces({layer: s.basis for layer, s in subspaces.items()})
        with torch.no_grad():
            deeper = RefinedTeacher.from_refiner(teacher, refiner).forward_taps(held_out, LAYERS)[LAYERS[-1]]
        cosines[stream] = token_cosines(deeper[:, p:], twin)
    assert cosines["refined"][artifacts].mean() > cosines["raw"][artifacts].mean() + 0.01    # measured 0.977 vs 0.948
    assert cosines["refined"][~artifacts].mean() >= cosines["raw"][~artifacts].mean()        # 0.989 vs 0.987
