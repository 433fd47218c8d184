"""Megatron-core extensions for RegMix-D: stage-indexed blends, the online controller, per-domain eval."""
