"""Data path: converted datasets -> decoded uint8 batches on the device -> augmented patches."""
