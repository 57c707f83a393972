"""Metrics: classification scores, exact modality Shapley values and imbalance, training FLOPs."""
