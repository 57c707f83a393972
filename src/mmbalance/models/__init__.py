"""Per-modality encoders, fusion heads, and the multimodal model that joins them."""
