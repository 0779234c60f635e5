"""Scaling, selective, bottleneck and sparse methods: IA3, BitFit, LN tuning, bottleneck adapters, SHiRA, diff pruning, layer selection, trainable tokens."""
