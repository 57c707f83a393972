"""Pretrained weights on local disk: finding a checkpoint in the Hugging Face and torch hub caches, and reading
a state file. Nothing here ever downloads; where weights are missing, a `UserError` says where it looked."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from mmbalance.errors import UserError
from mmbalance.paths import hf_hub_cache, torch_hub_checkpoints

__all__ = ["find_timm_weights", "load_state_file", "resnet18_weights_file"]

# what a checkpoint file in a Hugging Face repository is called, in the order timm tries them
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of `filenames` present in the local hub cache for `repo_id` (main revision), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers and timm both depend on huggingface_hub
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_hub_cache()))
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def load_state_file(path: str | os.PathLike, who: str) -> dict[str, Tensor]:
    """A state dict from a .safetensors, .pth/.pt/.bin file (weights only), unwrapping a "state_dict",
    "model" or "state_dict_ema" container; UserError naming the file when it cannot be read."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{who}: could not read pretrained weights from {path}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{who}: {path} does not hold a state dict of tensors")
    # checkpoints saved from DataParallel / torch.compile wrappers carry a prefix on every key
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def find_timm_weights(model_name: str, weights_path: str | None, who: str) -> str:
    """The local checkpoint file for timm model `model_name` ("arch" or "arch.tag"); never downloads.

    Looks at `weights_path` when given (a file, or a folder holding model.safetensors/pytorch_model.bin),
    else in the Hugging Face hub cache for the model's timm repository (e.g. timm/resnet18.a1_in1k), else,
    for checkpoints timm hosts at a URL, in the torch hub cache. Raises UserError naming every place looked.
    """
    if weights_path:
        path = Path(os.path.expanduser(str(weights_path)))
        if path.is_dir():
            for name in _HF_WEIGHT_FILES:
                if (path / name).is_file():
                    return str(path / name)
            raise UserError(
                f"{who}: weights_path {str(path)!r} is a folder without {' or '.join(_HF_WEIGHT_FILES[:2])}; "
                "point it at the checkpoint file"
            )
        if not path.is_file():
            raise UserError(
                f"{who}: weights_path {str(path)!r} does not exist (no download is attempted); point it at a "
                f"local checkpoint of timm's {model_name!r} (.safetensors or .pth), or set pretrained=false"
            )
        return str(path)
    import timm

    if str(model_name).startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise UserError(
            f"{who}: model {model_name!r}: hub prefixes are not used (nothing is downloaded); give the timm "
            "architecture name (e.g. vit_base_patch16_224) and weights_path pointing at the local checkpoint"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # unknown tag: timm raises different errors across versions
        cfg = None
    looked: list[str] = []
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        repo = cfg.hf_hub_id
        names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HF_WEIGHT_FILES
        found = _hf_cached_file(repo, names)
        if found:
            return found
        looked.append(f"the Hugging Face cache {hf_hub_cache()} (repository {repo})")
        hint = f"`hf download {repo}` on a machine with internet and copy its cache folder there (or set HF_HOME)"
    else:
        hint = "a checkpoint file"
    if cfg is not None and getattr(cfg, "url", None):
        legacy = torch_hub_checkpoints() / os.path.basename(cfg.url)
        if legacy.is_file():
            return str(legacy)
        looked.append(str(legacy))
    where = "; ".join(looked) if looked else f"nowhere: timm has no pretrained weights registered for {model_name!r}"
    raise UserError(
        f"{who}(pretrained=True) needs timm's {model_name!r} weights, but none were found offline "
        f"(no download is attempted). Looked in: {where}. Put them there with {hint}, set weights_path to a "
        "local checkpoint file, or set pretrained=false."
    )


_RESNET18_URL_NAME = "resnet18-f37072fd.pth"  # torchvision ResNet18_Weights.IMAGENET1K_V1


def resnet18_weights_file() -> str:
    """Where torch hub keeps torchvision's ImageNet ResNet-18 checkpoint (not downloaded here)."""
    try:
        from torchvision.models import ResNet18_Weights

        fname = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    except Exception:  # pragma: no cover - torchvision renamed something
        fname = _RESNET18_URL_NAME
    return str(torch_hub_checkpoints() / fname)
