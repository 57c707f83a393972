"""Datasets behind one interface: each builder returns a `DataSplits` of `MultimodalDataset`s."""
