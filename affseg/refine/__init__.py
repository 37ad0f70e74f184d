"""CAM refinement: affinities, random walk, PAR and pseudo-labels (SPEC §2.4)."""

from affseg.refine.affinity import combine_affinities, decoder_affinity, encoder_affinities, select_layers
from affseg.refine.par import par
from affseg.refine.pseudo import add_background, pseudo_labels, refine_cams
from affseg.refine.random_walk import box_masks, random_walk, sinkhorn, transition_matrix

__all__ = [
    "add_background",
    "box_masks",
    "combine_affinities",
    "decoder_affinity",
    "encoder_affinities",
    "par",
    "pseudo_labels",
    "random_walk",
    "refine_cams",
    "select_layers",
    "sinkhorn",
    "transition_matrix",
]
