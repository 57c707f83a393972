"""Where mmbalance looks for things outside a run folder: the Hugging Face hub cache and the torch hub
checkpoint folder, resolved when asked (so HF_HOME, HF_HUB_CACHE and TORCH_HOME set by the user count).

Data roots and mmbalance's own cache come from the config (`conf/paths/`: MMBALANCE_DATA, MMBALANCE_CACHE).
"""

from __future__ import annotations

import os
from pathlib import Path


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved now from the environment (huggingface_hub's rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), where torchvision and older timm keep weights."""
    import torch  # only the encoders that load weights ask, and they have torch loaded already

    return Path(torch.hub.get_dir()) / "checkpoints"
