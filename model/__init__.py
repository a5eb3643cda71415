"""ResNet encoder + projector, the fused EMP-SSL objective, and LARS."""
