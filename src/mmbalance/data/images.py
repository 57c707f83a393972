"""Photos, one per sample (Food-101): the uint8 image cache `mmbalance prepare` writes and the loader reads.

The cache is one memory-mapped file ``images_<S>.u8`` of rows x S x S x 3 uint8, each image after media.ClipTransform's
evaluation Resize((S, S)); ``images_<S>.u8.json`` records its progress, unreadable rows and the key of the image list
it was made for (docs/datasets.md, "The image cache"). Without a size the same pass only checks that every image
decodes (``image_check.json``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mmbalance.data import media
from mmbalance.data.prepare import PrepareContext, PreparedFolder
from mmbalance.errors import DataError

log = logging.getLogger(__name__)


def cache_name(size: int) -> str:
    return f"images_{size}.u8"


class Images:
    """Item i's (3, H, W) uint8 image: row `rows[i]` of the cache (`cache`: its file and row count; H = W = S), or
    decoded from `paths[i]`. The memmap is opened lazily, in each DataLoader worker."""

    def __init__(self, paths: list[str], size: int, dataset: str, cache: tuple[str, int] | None, rows: np.ndarray):
        self.paths, self.size, self.dataset = list(paths), size, dataset
        self.cache, self.rows, self._mm = cache, rows, None

    def __getstate__(self):  # a memmap is reopened in each worker, not pickled
        return {**self.__dict__, "_mm": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            if self._mm is None:
                file, n = self.cache
                self._mm = np.memmap(file, dtype=np.uint8, mode="r", shape=(n, self.size, self.size, 3))
            return torch.from_numpy(np.array(self._mm[self.rows[i]])).permute(2, 0, 1)
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            return pil_to_tensor(media.read_image(self.paths[i]))
        except DataError as exc:
            raise DataError(f"{self.dataset}: {exc}; run `mmbalance prepare {self.dataset}` to list and skip bad "
                            "images") from None


def cached_images(folder: Path, key: str | None, size: int) -> tuple[str, int] | None:
    """(file, rows) of the complete cache at this size in a prepared folder, made for the image list `key`, or
    None (logged when one is there but not usable)."""
    file, prepared = folder / cache_name(size), PreparedFolder(folder)
    if not prepared.has(file.name, f"{file.name}.json"):
        return None
    info = prepared.json(f"{file.name}.json")
    if not info.get("complete") or info.get("candidates_sha1") != key:
        log.info("%s is incomplete or from another scan; decoding jpegs instead", file)
        return None
    n = int(info["rows"])
    if file.stat().st_size != n * size * size * 3:
        log.warning("%s has the wrong size for %d rows of %dx%d; decoding jpegs instead", file, n, size, size)
        return None
    return str(file), n


def _decode_block(task: tuple) -> list[tuple[int, str | None]]:
    """Decode (and, with a cache, resize and store) a block of images; return (row, error or None)."""
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    items, cache_file, rows, size = task
    mm = None if cache_file is None else np.memmap(cache_file, dtype=np.uint8, mode="r+", shape=(rows, size, size, 3))
    out = []
    for row, path in items:
        try:
            img = media.read_image(path)
        except DataError as exc:
            out.append((row, str(exc)))
            continue
        if mm is not None:  # ClipTransform's evaluation Resize((S, S))
            mm[row] = resize(pil_to_tensor(img), [size, size], antialias=True).permute(1, 2, 0).numpy()
        out.append((row, None))
    if mm is not None:
        mm.flush()
    return out


def decode_images(ctx: PrepareContext, paths: list[str], key: str, size: int | None,
                 block: int) -> tuple[dict[int, str], str | None]:
    """Decode every image once, in blocks of `block` rows saved as they finish (--force starts again); with
    `size`, also fill the cache. Returns ({row: why unreadable}, cache file or None)."""
    # imported here once: worker processes forked by ctx.map inherit it instead of importing it per block
    import torchvision.transforms.v2.functional  # noqa: F401

    n = len(paths)
    stage = cache_name(size) if size else "image_check"
    cache_file = str(ctx.out / stage) if size else None
    info = {} if ctx.force else ctx.folder.json(f"{stage}.json", optional=True)
    if info.get("candidates_sha1") != key or (size and not ctx.folder.has(stage)):  # start again
        info = {"candidates_sha1": key, "rows": n, "size": size, "done": 0, "bad": {}, "complete": False}
        if cache_file:
            np.memmap(cache_file, dtype=np.uint8, mode="w+", shape=(n, size, size, 3)).flush()
    chunk = max(1, min(256, block // max(1, ctx.workers * 2)))
    while info["done"] < n:
        start, stop = info["done"], min(n, info["done"] + block)
        tasks = [([(r, paths[r]) for r in range(a, min(stop, a + chunk))], cache_file, n, size or 0)
                 for a in range(start, stop, chunk)]
        for results in ctx.map(_decode_block, tasks, desc=f"images {start}-{stop} of {n}"):
            info["bad"].update({str(row): err for row, err in results if err is not None})
        info["done"] = stop
        ctx.folder.write_json(f"{stage}.json", info)
    if not info["complete"]:
        info["complete"] = True
        ctx.folder.write_json(f"{stage}.json", info)
    return {int(k): v for k, v in info["bad"].items()}, cache_file
