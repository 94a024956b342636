"""The masked-layer core: the only place that knows how a pruning mask is made.

:mod:`.core` makes a layer's mask (scores, ``num_kept``, straight-through top-k, phases, dense export);
:mod:`.allocation` decides how many weights each layer keeps (``layerwise``, ``global``, ``erk``, ``learned``) and
attaches the masks (:func:`apply_masks`); :mod:`.channel` masks whole output channels (``granularity="channel"``)
and removes them from a plain model (:func:`narrowed`).
"""
from .allocation import ALLOCATIONS, CHANNEL_ALLOCATIONS, GRANULARITIES, INITS, GlobalPlan, LearnedPlan, \
    apply_masks, check_granularity, erk_counts, erk_logits, fill, largest_remainder
from .channel import CHANNEL_SCORES, ChannelGroup, ChannelMask, WeightL1ChannelMask, channel_counts, channel_groups, \
    channel_scores, compacted, kept_channels, narrowed
from .core import NORM_LAYERS, PHASES, PRUNABLE, Phase, Plan, TopKMask, allocation_counts, cached, check_k, \
    dense_copy, is_masked, mask_of, masked_layers, num_kept, prunable_layers, rate_parameters, raw_weight, \
    remove_masks, scaled_scores, scores, set_phase, sparsity

__all__ = ["ALLOCATIONS", "CHANNEL_ALLOCATIONS", "CHANNEL_SCORES", "GRANULARITIES", "INITS", "NORM_LAYERS", "PHASES", "PRUNABLE",
           "ChannelGroup", "ChannelMask", "GlobalPlan", "LearnedPlan", "Phase", "Plan", "TopKMask", "WeightL1ChannelMask",
           "allocation_counts", "apply_masks", "cached", "channel_counts", "channel_groups", "channel_scores",
           "check_granularity", "compacted", "check_k", "dense_copy", "erk_counts", "erk_logits", "fill", "is_masked",
           "kept_channels", "largest_remainder", "mask_of", "masked_layers", "narrowed", "num_kept",
           "prunable_layers", "rate_parameters", "raw_weight", "remove_masks", "scaled_scores", "scores",
           "set_phase", "sparsity"]
