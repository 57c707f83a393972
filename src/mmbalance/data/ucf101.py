"""UCF-101 action recognition with two modalities: RGB frames and pre-computed TV-L1 optical flow.

Reference: datasets.md §1.5, §2 "UCF-101", §5 "ucf101", §6 items 2 and 7. 13,320 clips, 101 classes; the
official split files (``UCF101TrainTestSplits-RecognitionTask.zip`` -> ``ucfTrainTestlist/``):
``classInd.txt`` (``1 ApplyEyeMakeup``, 1-based), ``trainlist0N.txt`` (``ApplyEyeMakeup/v_..._g08_c01.avi 1``)
and ``testlist0N.txt`` (no label: it is taken from the class folder of the path). Split 1 (9,537 / 3,783) is the
default; ``split`` picks 1-3. Class indices follow classInd (0-based here).

Accepted layouts (autodetected under ``root``, up to four folder levels deep; ``splits_dir``/``rgb_dir``/
``flow_dir`` pin them). Frame files are globbed and sorted naturally -- never a hard-coded frame count:

* RGB: twostreamfusion ``jpegs_256/v_<Class>_gNN_cNN/frame000001.jpg``; BalanceBenchmark
  ``<visual>/v_.../frame_00001.jpg`` (any folder of ``v_*`` frame folders); mmaction2 rawframes
  ``rawframes/<Class>/v_.../img_00001.jpg``;
* flow: twostreamfusion ``tvl1_flow/{u,v}/v_.../frame000001.jpg`` (one 8-bit grey jpg per direction); mmaction2
  rawframes ``rawframes/<Class>/v_.../flow_x_00001.jpg`` + ``flow_y_00001.jpg``.
Video folders are matched case-insensitively (the split files say ``v_HandStandPushups_...`` where some
extractions wrote ``v_HandstandPushups_...``). Flow is never computed here: TV-L1 takes GPU-days, download it.

Recipe (BalanceBenchmark ``ucf101_dataset.py``, with its flow bugs fixed -- §6 item 7):

* ``visual`` (T, 3, S, S): ``frames`` (3) RGB frames sampled segment-wise (random frame per segment in
  training, the centre at evaluation), ImageNet normalisation;
* ``flow`` (T, 2, S, S): ``flow_frames`` (3) (u, v) pairs sampled segment-wise on their own, scaled to [-1, 1]
  (x / 127.5 - 1, so zero motion is 0; the peer feeds [0, 1]);
* training augmentation ``resize_flip``: Resize((S, S)) + horizontal flip drawn ONCE per clip and applied to the
  RGB frames and the flow together, with u (horizontal motion) negated on a flip. The peer flips RGB, u and v
  independently and never negates u. Evaluation: Resize((S, S)) only (deterministic);
* validation: UCF-101 has none, so a stratified, seeded 10 % of the training list (DECISIONS).

``mmbalance prepare ucf101 --root RAW --out PREP`` checks every video of the split files (a missing or empty
RGB/flow folder is listed in prepare_report.txt and skipped), writes manifest.csv (with the split of every
available split file) and classes.json, and caches up to ``max_frames`` evenly spread frames per video and
modality (uint8 ``visual.npy`` (N, F, 3, S, S), ``flow.npy`` (N, F, 2, S, S)) for
``build_ucf101(prepared=PREP)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data import media
from mmbalance.data.batch import DataSplits, ModalitySpec, stratified_split
from mmbalance.data.clips import (CACHE_META, Clip, cache_meta_or_none, check_cache_finite, fill_cache_rows,
                                  load_clip_cache, log_uncached)
from mmbalance.data.prepare import (PrepareContext, read_classes, read_json, read_manifest, resolve_prepared,
                                    write_classes, write_manifest)
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

MODALITIES = ("visual", "flow")
CHANNELS = {"visual": 3, "flow": 2}
_PREPARED_MARKERS = ("manifest.csv", CACHE_META, "prepare_summary.json")
_NAME = re.compile(r"^v_(.+)_g\d+_c\d+$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# split files


def read_class_ind(path: Path) -> list[str]:
    """Class names in classInd.txt order (`<1-based index> <name>` per line)."""
    rows = media.read_split_file(path)
    try:
        pairs = sorted((int(i), name) for i, name in rows)
    except ValueError:
        raise DataError(f"{path}: expected lines '<index> <ClassName>' (e.g. '1 ApplyEyeMakeup')") from None
    if [i for i, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise DataError(f"{path}: class indices must be 1..{len(pairs)} without gaps")
    return [name for _, name in pairs]


def read_split_list(path: Path, classes: list[str]) -> list[tuple[str, int]]:
    """[(video name without .avi, class index)] from a trainlist/testlist file. The class comes from the folder of
    the path (testlists have no label); a trainlist label that disagrees with it is an error."""
    index = {c.lower(): i for i, c in enumerate(classes)}
    out = []
    for rel, label in media.read_split_file(path):
        parts = rel.replace("\\", "/").split("/")
        name = parts[-1].rsplit(".", 1)[0] if parts[-1].lower().endswith((".avi", ".mp4")) else parts[-1]
        folder = parts[-2] if len(parts) > 1 else (_NAME.match(name).group(1) if _NAME.match(name) else "")
        if folder.lower() not in index:
            raise DataError(f"{path}: {rel!r} is in class folder {folder!r}, which classInd.txt does not list")
        y = index[folder.lower()]
        if label and label.isdigit() and int(label) - 1 != y:
            raise DataError(f"{path}: {rel!r} has label {label} but its class folder {folder!r} is index {y + 1} "
                            "in classInd.txt")
        out.append((name, y))
    return out


def split_files(split_dir: Path) -> dict[int, tuple[Path, Path]]:
    """{split number: (trainlist, testlist)} for the split files present."""
    return {k: (split_dir / f"trainlist0{k}.txt", split_dir / f"testlist0{k}.txt") for k in (1, 2, 3)
            if (split_dir / f"trainlist0{k}.txt").is_file() or (split_dir / f"testlist0{k}.txt").is_file()}


def read_splits(split_dir: Path, split: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    """(classes, [(video, label, 'train'|'test')]) of official split `split`."""
    if split not in (1, 2, 3):
        raise UserError(f"dataset.split={split}; UCF-101 has official splits 1, 2 and 3")
    classes = read_class_ind(split_dir / "classInd.txt")
    train, test = split_dir / f"trainlist0{split}.txt", split_dir / f"testlist0{split}.txt"
    for p in (train, test):
        if not p.is_file():
            raise DataError(f"UCF-101 split file {str(p)!r} does not exist (split {split}; expected "
                            "ucfTrainTestlist/{trainlist,testlist}0N.txt)")
    videos = [(n, y, "train") for n, y in read_split_list(train, classes)]
    videos += [(n, y, "test") for n, y in read_split_list(test, classes)]
    return classes, videos


# ---------------------------------------------------------------------------------------------------------------
# layout detection


@dataclass
class _Dir:
    path: Path
    files: set[str]
    subdirs: list[str]


def _scan(root: Path, depth: int = 4, exclude: tuple[Path, ...] = ()) -> list[_Dir]:
    """Every folder under root (to `depth` levels) except video folders (`v_*`, never descended: there are 13k of
    them), hidden folders, mmbalance prepared outputs and `exclude`."""
    excluded = {p.resolve() for p in exclude}
    out, level = [], [root]
    for d in range(depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            files = {e.name for e in entries if e.is_file()}
            subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
            if folder != root and any(m in files for m in _PREPARED_MARKERS):
                continue
            out.append(_Dir(folder, files, subdirs))
            if d < depth:
                nxt += [folder / s for s in subdirs if not s.lower().startswith("v_")
                        and (folder / s).resolve() not in excluded]
        level = nxt
    return out


def find_split_dir(root: Path, splits_dir: str | None = None, scanned: list[_Dir] | None = None) -> Path:
    """The folder with classInd.txt: `splits_dir`, else found under root (ucfTrainTestlist/ as unzipped)."""
    if splits_dir:
        path = Path(splits_dir).expanduser()
        path = path if path.is_absolute() else root / path
        if not (path / "classInd.txt").is_file():
            raise DataError(f"dataset.splits_dir: {str(path / 'classInd.txt')!r} does not exist")
        return path
    found = [d.path for d in (scanned or _scan(root)) if "classInd.txt" in d.files]
    if not found:
        raise DataError(f"{root}: no UCF-101 split files found (ucfTrainTestlist/classInd.txt, trainlist0N.txt, "
                        "testlist0N.txt from UCF101TrainTestSplits-RecognitionTask.zip); unzip them into the root "
                        "or set dataset.splits_dir")
    found.sort(key=lambda p: (p.name != "ucfTrainTestlist", len(p.parts)))
    return found[0]


@dataclass
class Source:
    """Where one modality's frames live: {lower-case video name: folder} per stream, plus file prefixes."""

    kind: str  # e.g. 'twostreamfusion jpegs_256', 'mmaction rawframes'
    root: Path
    index: dict[str, dict[str, Path]]  # stream ('visual' | 'flow_u' | 'flow_v') -> {video: folder}
    prefix: dict[str, str]

    def hits(self, names: set[str]) -> int:
        return min(len(names.intersection(ix)) for ix in self.index.values())


def _frame_style(files: list[str]) -> str:
    name = sorted(files, key=media.natural_key)[0] if files else ""
    if re.match(r"frame\d{6}\.", name):
        return "frame000001.jpg"
    if re.match(r"frame_\d+\.", name):
        return "frame_00001.jpg"
    return name or "empty"


def _sources(scanned: list[_Dir], names: set[str]) -> tuple[list[Source], list[Source]]:
    """Candidate RGB and flow sources among the scanned folders: a folder whose sub-folders are video folders of
    the split lists is a container; its kind is told from its name (u/v) and from one video folder's files."""
    containers = []
    for d in scanned:
        videos = {s.lower(): d.path / s for s in d.subdirs if s.lower().startswith("v_")}
        if names.intersection(videos):
            sample = videos[sorted(names.intersection(videos))[0]]
            try:
                files = [e.name for e in os.scandir(sample) if e.is_file()]
            except OSError:
                files = []
            containers.append((d, videos, files))
    rgb, flow = [], []
    mm_rgb: dict[Path, dict] = {}  # mmaction: per-class containers merged under their rawframes root
    mm_flow: dict[Path, dict] = {}
    uv: dict[Path, dict[str, dict]] = {}
    for d, videos, files in containers:
        lowered = [f.lower() for f in files]
        if any(f.startswith("flow_x") for f in lowered):
            mm_flow.setdefault(d.path.parent, {}).update(videos)
        if any(f.startswith("img_") for f in lowered):
            mm_rgb.setdefault(d.path.parent, {}).update(videos)
        elif d.path.name.lower() in ("u", "v"):
            uv.setdefault(d.path.parent, {})[d.path.name.lower()] = videos
        elif not any(f.startswith("flow_") for f in lowered):
            kind = "twostreamfusion jpegs_256" if _frame_style(files) == "frame000001.jpg" else "frame folders"
            if _frame_style(files) == "frame_00001.jpg":
                kind = "BalanceBenchmark frame folders"
            rgb.append(Source(kind, d.path, {"visual": videos}, {"visual": ""}))
    for parent, videos in mm_rgb.items():
        rgb.append(Source("mmaction rawframes", parent, {"visual": videos}, {"visual": "img_"}))
    for parent, videos in mm_flow.items():
        flow.append(Source("mmaction rawframes flow_x/flow_y", parent, {"flow_u": videos, "flow_v": videos},
                           {"flow_u": "flow_x_", "flow_v": "flow_y_"}))
    for parent, pair in uv.items():
        if "u" in pair and "v" in pair:
            flow.append(Source("twostreamfusion tvl1_flow u/v", parent, {"flow_u": pair["u"], "flow_v": pair["v"]},
                               {"flow_u": "", "flow_v": ""}))
    return rgb, flow


def _choose(candidates: list[Source], names: set[str], what: str, option: str, root: Path) -> Source | None:
    ranked = sorted(candidates, key=lambda s: -s.hits(names))
    if not ranked or ranked[0].hits(names) == 0:
        return None
    if len(ranked) > 1 and ranked[1].hits(names) == ranked[0].hits(names):
        raise DataError(f"{root}: two {what} trees cover the same videos ({ranked[0].root} and {ranked[1].root}); "
                        f"pick one with dataset.{option}=<folder>")
    return ranked[0]


@dataclass
class Layout:
    split_dir: Path
    sources: dict[str, Source]  # modality -> Source
    notes: dict = field(default_factory=dict)

    @property
    def prefixes(self) -> dict[str, str]:
        return {k: v for s in self.sources.values() for k, v in s.prefix.items()}


def detect_layout(root: Path, names: set[str], modalities: tuple[str, ...], split_dir: Path,
                  rgb_dir: str | None = None, flow_dir: str | None = None, scanned: list[_Dir] | None = None,
                  exclude: tuple[Path, ...] = ()) -> Layout:
    """Find the RGB and flow trees that hold the split's videos (DataError naming root when one is missing)."""
    scanned = scanned if scanned is not None else _scan(root, exclude=exclude)

    def pinned(value: str | None, option: str) -> list[_Dir] | None:
        if not value:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            raise DataError(f"dataset.{option}: folder {str(path)!r} does not exist")
        return _scan(path)

    sources = {}
    want = {"visual": ("RGB frame", "rgb_dir", rgb_dir, 0), "flow": ("optical flow", "flow_dir", flow_dir, 1)}
    for m in modalities:
        what, option, value, k = want[m]
        tree = pinned(value, option)
        source = _choose(_sources(tree if tree is not None else scanned, names)[k], names, what, option, root)
        if source is None:
            where = f"dataset.{option}={value}" if value else str(root)
            expected = ("jpegs_256/v_<Class>_gNN_cNN/frame000001.jpg, <visual>/v_.../frame_00001.jpg or "
                        "rawframes/<Class>/v_.../img_00001.jpg") if m == "visual" else \
                ("tvl1_flow/{u,v}/v_<Class>_gNN_cNN/frame000001.jpg or rawframes/<Class>/v_.../flow_x_00001.jpg "
                 "(pre-computed TV-L1 flow: mmbalance does not compute it)")
            raise DataError(f"{where}: no {what} folders for the {len(names)} videos of the split lists; "
                            f"expected {expected}")
        sources[m] = source
    notes = {"splits_dir": str(split_dir)}
    for m, s in sources.items():
        notes[f"{m}_layout"] = s.kind
        notes[f"{m}_dir"] = str(s.root)
    return Layout(split_dir, sources, notes)


def find_clips(root: str | Path, split: int = 1, modalities: tuple[str, ...] = MODALITIES,
               splits_dir: str | None = None, rgb_dir: str | None = None, flow_dir: str | None = None,
               exclude: tuple[Path, ...] = ()) -> tuple[list[Clip], list[str], Layout, list[tuple[str, str]]]:
    """(clips with sources {visual, flow_u, flow_v}, classes, layout, [(video, why)] of videos left out)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root: UCF-101 folder {str(root)!r} does not exist")
    scanned = _scan(root, exclude=exclude)
    split_dir = find_split_dir(root, splits_dir, scanned)
    classes, videos = read_splits(split_dir, split)
    names = {n.lower() for n, _, _ in videos}
    layout = detect_layout(root, names, modalities, split_dir, rgb_dir, flow_dir, scanned, exclude)
    streams = {k: ix for s in layout.sources.values() for k, ix in s.index.items()}
    clips, missing = [], []
    for name, label, part in videos:
        gone = [k for k, ix in streams.items() if name.lower() not in ix]
        if gone:
            missing.append((name, "no " + " / ".join(gone) + " frame folder"))
            continue
        clips.append(Clip(name, label, part, {k: str(ix[name.lower()]) for k, ix in streams.items()}))
    return clips, classes, layout, missing


# ---------------------------------------------------------------------------------------------------------------
# the dataset: RGB and flow of a clip share one augmentation draw


def _rescale(params: dict, src: tuple[int, int], dst: tuple[int, int]) -> dict:
    """A drawn crop box (top, left, h, w) moved from a src-sized frame to a dst-sized one (RGB and flow jpgs
    may differ in size); flip and angle carry over unchanged."""
    if params.get("crop") is None or src == dst:
        return params
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    top, left, h, w = params["crop"]
    return {**params, "crop": (int(round(top * sy)), int(round(left * sx)), max(1, int(round(h * sy))),
                               max(1, int(round(w * sx))))}


def _hw(frame) -> tuple[int, int]:
    return tuple(frame.shape[-2:]) if isinstance(frame, Tensor) else (frame.height, frame.width)


class UCFDataset(Dataset):
    """UCF-101 clips -> {"visual": (T, 3, S, S), "flow": (T, 2, S, S)}, from the raw frame folders or from the
    prepared cache (`cache_dir` + `rows`). Frames are sampled per modality; the augmentation is drawn once per
    clip (from the first modality) and applied to every modality, flow with u negated on a flip."""

    def __init__(self, clips: list[Clip], modalities: tuple[str, ...], frames: dict[str, int], size: int,
                 augment: str, train: bool, prefixes: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None, rows: np.ndarray | None = None):
        self.clips, self.modalities, self.frames = list(clips), tuple(modalities), dict(frames)
        self.size, self.train, self.prefixes = int(size), bool(train), dict(prefixes or {})
        self.labels = np.array([c.label for c in self.clips], dtype=np.int64)
        aug = augment if train else "none"
        self.transforms = {"visual": media.ClipTransform(size, train, aug, "imagenet"),
                           "flow": media.ClipTransform(size, train, aug, "flow", flow_pairs=True)}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.rows = None if rows is None else np.asarray(rows)
        self._arrays: dict | None = None

    def __len__(self) -> int:
        return len(self.clips)

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        return {**self.__dict__, "_arrays": None}

    def _cache(self) -> dict:
        if self._arrays is None:
            self._arrays = {m: np.load(self.cache_dir / f"{m}.npy", mmap_mode="r") for m in self.modalities}
            self._arrays["_n_frames"] = np.load(self.cache_dir / "n_frames.npy")
            self._arrays["_columns"] = json.loads((self.cache_dir / CACHE_META).read_text())["modalities"]
        return self._arrays

    def _sample(self, i: int, m: str, generator: torch.Generator | None) -> list:
        """The modality's sampled frames: PIL/uint8 RGB images, or interleaved u, v grey images for flow."""
        k = self.frames[m]
        if self.cache_dir is not None:
            arrays, row = self._cache(), int(self.rows[i])
            n = int(arrays["_n_frames"][row, list(arrays["_columns"]).index(m)])
            idx = media.segment_indices(max(n, 1), k, self.train, generator)
            x = torch.from_numpy(np.ascontiguousarray(arrays[m][row, idx]))  # (k, C, S, S) uint8
            return list(x if m == "visual" else x.reshape(-1, 1, *x.shape[-2:]))
        clip = self.clips[i]
        if m == "visual":
            files = media.list_frames(clip.sources["visual"], self.prefixes.get("visual", ""))
            return [media.read_image(files[j]) for j in media.segment_indices(len(files), k, self.train, generator)]
        u = media.list_frames(clip.sources["flow_u"], self.prefixes.get("flow_u", ""))
        v = media.list_frames(clip.sources["flow_v"], self.prefixes.get("flow_v", ""))
        out = []
        for j in media.segment_indices(min(len(u), len(v)), k, self.train, generator):
            out += [media.read_image(u[j], "L"), media.read_image(v[j], "L")]
        return out

    def item(self, i: int, generator: torch.Generator | None = None) -> dict:
        inputs, params, ref = {}, None, None
        for m in self.modalities:
            try:
                frames = self._sample(i, m, generator)
            except DataError as exc:
                raise DataError(f"clip {self.clips[i].id!r} ({m}): {exc}") from None
            hw = _hw(frames[0])
            if params is None:  # one draw per clip, shared by RGB and flow
                params, ref = self.transforms[m].draw(*hw, generator), hw
            inputs[m] = self.transforms[m](frames, params=_rescale(params, ref, hw))
        return {"inputs": inputs, "label": int(self.labels[i]), "index": i}

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


def _specs(modalities, frames: dict[str, int], size: int) -> dict[str, ModalitySpec]:
    return {m: ModalitySpec("frames", (frames[m], CHANNELS[m], size, size)) for m in modalities}


def _counts(clips: list[Clip]) -> dict[str, int]:
    return {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------------------------
# the builder


def _modalities(modalities) -> tuple[str, ...]:
    mods = tuple(modalities or MODALITIES)
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods or len(set(mods)) != len(mods):
        raise UserError(f"dataset.modalities={list(mods)}; expected a non-empty list of {list(MODALITIES)}")
    return mods


def build_ucf101(root: str | None = None, prepared: str | None = None, split: int = 1,
                 modalities: list[str] | tuple[str, ...] = MODALITIES, splits_dir: str | None = None,
                 rgb_dir: str | None = None, flow_dir: str | None = None, frames: int = 3, flow_frames: int = 3,
                 image_size: int = 224, augment: str = "resize_flip", val_fraction: float = 0.1,
                 split_seed: int = 0) -> DataSplits:
    """UCF-101 as DataSplits with modalities visual (frames (frames, 3, S, S)) and flow (frames (flow_frames, 2,
    S, S)); layouts and recipe in the module docstring.

    root: the raw tree; prepared: the `mmbalance prepare ucf101 --out` folder (fast path). split: official split
    1-3. modalities: which of visual/flow to load, in fusion order. splits_dir/rgb_dir/flow_dir pin the layout.
    augment: training augmentation shared by RGB and flow (resize_flip = BalanceBenchmark's Resize + HFlip;
    crop_flip, rotate_flip, none). val_fraction/split_seed: the stratified validation carve from train.
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    mods = _modalities(modalities)
    if augment not in media.ClipTransform.AUGMENTS:
        raise UserError(f"dataset.augment={augment!r}; expected one of {media.ClipTransform.AUGMENTS}")
    nframes = {"visual": int(frames), "flow": int(flow_frames)}
    if prepared:
        folder = Path(prepared).expanduser()
        clips, classes, cache_dir, notes = _prepared_clips(folder, split, mods)
        prefixes = {}  # the cache holds decoded frames: no file names to match
    else:
        if not root:
            raise UserError("dataset.root is not set: point it at the UCF-101 folder, or set dataset.prepared")
        clips, classes, layout, missing = find_clips(root, split, mods, splits_dir, rgb_dir, flow_dir)
        if not clips:
            raise DataError(f"{root}: none of the videos of split {split} has all of {list(mods)}")
        if missing:
            log.warning("ucf101: %d videos of split %d have no %s frames and are left out (first: %s: %s)",
                        len(missing), split, "/".join(mods), *missing[0])
        cache_dir, prefixes = None, layout.prefixes
        log.info("ucf101: split %d, %s; %d videos, %d left out for missing frames", split,
                 ", ".join(f"{m}: {s.kind} ({s.root})" for m, s in layout.sources.items()), len(clips), len(missing))
        notes = {"layout": ", ".join(f"{m}: {s.kind}" for m, s in layout.sources.items()), **layout.notes,
                 "source": "raw", "missing_videos": len(missing), "missing_examples": [n for n, _ in missing[:5]]}
    train_all = [c for c in clips if c.split == "train"]
    test = [c for c in clips if c.split == "test"]
    if not train_all or not test:
        raise DataError(f"UCF-101 split {split}: {len(train_all)} training and {len(test)} test videos found; both "
                        "must be non-empty")
    keep, held = stratified_split(np.array([c.label for c in train_all]), val_fraction, split_seed)
    parts = {"train": [train_all[i] for i in keep], "val": [train_all[i] for i in held], "test": test}

    def dataset(name: str) -> UCFDataset:
        items, rows = parts[name], None
        if cache_dir is not None:
            rows, kept = load_clip_cache(cache_dir, items)
            kept_ids = {c.id for c in kept}
            uncached.extend(c.id for c in items if c.id not in kept_ids)
            items = kept
        return UCFDataset(items, mods, nframes, image_size, augment, name == "train", prefixes, cache_dir, rows)

    uncached: list[str] = []
    datasets = {name: dataset(name) for name in parts}
    notes.update(split=split, clips={k: len(v) for k, v in parts.items()})
    if cache_dir is not None:  # uint8 frames hold no NaN, but this opens every array: a broken one fails here
        notes["uncached_clips"] = log_uncached(cache_dir, uncached)
        check_cache_finite(cache_dir, mods, {name: d.rows for name, d in datasets.items()})
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], _specs(mods, nframes, image_size),
                      len(classes), list(classes),
                      val_source=f"carved from train (stratified, {val_fraction:.0%}, seed {split_seed})",
                      notes=notes)


def _prepared_clips(folder: Path, split: int, mods: tuple[str, ...]) -> tuple[list[Clip], list[str], Path, dict]:
    meta_path = folder / CACHE_META
    if not meta_path.is_file():
        raise DataError(f"dataset.prepared {str(folder)!r} is not a prepared UCF-101 cache ({CACHE_META} missing); "
                        "run `mmbalance prepare ucf101 --root RAW --out <folder>`")
    meta = read_json(meta_path)
    lacking = [m for m in mods if m not in meta.get("modalities", {})]
    if lacking:
        raise DataError(f"dataset.prepared {str(folder)!r} has no {lacking} cache (it holds "
                        f"{sorted(meta.get('modalities', {}))}); prepare again with those modalities")
    rows = read_manifest(folder)
    column = f"split{split}"
    if rows and column not in rows[0]:
        have = [k[-1] for k in rows[0] if re.fullmatch(r"split\d", k)]
        raise DataError(f"dataset.prepared {str(folder)!r} has no split {split} (the split files prepared were "
                        f"{have}); set dataset.split to one of them")
    clips = [Clip(r["id"], int(r["label"]), r[column], {k: r[k] for k in ("visual", "flow_u", "flow_v") if r.get(k)})
             for r in rows if r[column] in ("train", "test")]
    layout = read_json(folder / "prepare_summary.json", optional=True).get("layout", "unknown")
    notes = {"layout": f"prepared cache ({layout})", "prepared": str(folder), "source": "prepared",
             "cache_frame_size": meta.get("size"), "cache_max_frames": meta.get("max_frames")}
    return clips, read_classes(folder), folder, notes


# ---------------------------------------------------------------------------------------------------------------
# prepare


def _count_frames(task: tuple) -> tuple[int, dict[str, int], str | None, str | None]:
    """Worker: the frame count of each stream of one video, or the first error (path, why)."""
    i, sources, prefixes = task
    counts = {}
    for k, folder in sources.items():
        try:
            counts[k] = len(media.list_frames(folder, prefixes.get(k, "")))
        except DataError as exc:
            return i, counts, folder, str(exc)
    return i, counts, None, None


def _pick(n: int, max_frames: int) -> np.ndarray:
    """Up to max_frames indices spread evenly over n frames (all of them when n <= max_frames)."""
    return np.linspace(0, n - 1, max_frames).round().astype(int) if n > max_frames else np.arange(n)


def _cache_one(task: tuple) -> tuple[int, str | None]:
    """Worker: decode one video's sampled frames, resize to size x size, write its rows of the cache memmaps."""
    import torchvision.transforms.v2.functional as TF

    row, clip, mods, prefixes, cache_dir, size, max_frames = task
    cache_dir = Path(cache_dir)

    def load(path, mode):
        return TF.resize(TF.pil_to_tensor(media.read_image(path, mode)), [size, size], antialias=True).numpy()

    try:
        counts = []
        for m in mods:
            out = np.zeros((max_frames, CHANNELS[m], size, size), dtype=np.uint8)
            if m == "visual":
                files = media.list_frames(clip.sources["visual"], prefixes.get("visual", ""))
                pick = _pick(len(files), max_frames)
                for k, j in enumerate(pick):
                    out[k] = load(files[j], "RGB")
            else:
                u = media.list_frames(clip.sources["flow_u"], prefixes.get("flow_u", ""))
                v = media.list_frames(clip.sources["flow_v"], prefixes.get("flow_v", ""))
                pick = _pick(min(len(u), len(v)), max_frames)
                for k, j in enumerate(pick):
                    out[k, 0:1], out[k, 1:2] = load(u[j], "L"), load(v[j], "L")
            arr = np.load(cache_dir / f"{m}.npy", mmap_mode="r+")
            arr[row] = out
            arr.flush()
            counts.append(len(pick))
        nf = np.load(cache_dir / "n_frames.npy", mmap_mode="r+")
        nf[row] = counts
        nf.flush()
    except DataError as exc:
        return row, str(exc)
    return row, None


def write_ucf_cache(ctx: PrepareContext, clips: list[Clip], mods: tuple[str, ...], prefixes: dict[str, str],
                    size: int = 224, max_frames: int = 10) -> dict:
    """The UCF-101 counterpart of clips.write_clip_cache (same files and resume rules, readable by
    clips.load_clip_cache): `<modality>.npy` (N, max_frames, C, S, S) uint8 with C = 3 (RGB) or 2 (u, v),
    `n_frames.npy` (N, modalities), `done.npy`, cache.json. Frames are spread evenly over the video when it has
    more than max_frames, so training still samples segment-wise from the whole clip."""
    from numpy.lib.format import open_memmap

    out = Path(ctx.out)
    n = len(clips)
    meta = {"ids": [c.id for c in clips], "size": size, "max_frames": max_frames, "dataset": "ucf101",
            "modalities": {m: {"kind": "frames", "shape": [max_frames, CHANNELS[m], size, size]} for m in mods}}
    meta_path, done_path = out / CACHE_META, out / "done.npy"
    if ctx.force or not meta_path.is_file() or cache_meta_or_none(meta_path) != meta:
        for m in mods:
            open_memmap(out / f"{m}.npy", mode="w+", dtype=np.uint8,
                        shape=(n, max_frames, CHANNELS[m], size, size)).flush()
        np.save(out / "n_frames.npy", np.zeros((n, len(mods)), dtype=np.int16))
        np.save(done_path, np.zeros(n, dtype=bool))
        meta_path.write_text(json.dumps(meta))
    summary = fill_cache_rows(ctx, clips, done_path, _cache_one,
                              lambda i: (i, clips[i], mods, prefixes, str(out), size, max_frames), "caching videos")
    return {**summary, "cache_frame_size": size, "cache_max_frames": max_frames}


def prepare(ctx: PrepareContext, split: int = 1, modalities: list[str] | tuple[str, ...] = MODALITIES,
            splits_dir: str | None = None, rgb_dir: str | None = None, flow_dir: str | None = None,
            size: int = 224, max_frames: int = 10, cache: bool = True) -> dict:
    """`mmbalance prepare ucf101`: validate (every video's RGB and flow folders exist and have frames), write
    manifest.csv (id, label, label_name, split, split1..3, visual, flow_u, flow_v, n_visual, n_flow) and
    classes.json, then cache the frames.

    Options (--set key=value): split (which split the `split` column shows; the manifest has every split file
    found), modalities, splits_dir/rgb_dir/flow_dir (pin the layout), size (cached frame side, 224), max_frames
    (frames kept per video and modality, 10), cache (false: stop after the manifest). Flow is used as
    downloaded; it is never computed.
    """
    mods = _modalities(modalities)
    clips, classes, layout, missing = find_clips(ctx.root, split, mods, splits_dir, rgb_dir, flow_dir,
                                                 exclude=(ctx.out,))
    for name, why in missing:
        ctx.problem(name, why)
    # every video is in exactly one list of each split: record all splits, so one cache serves splits 1-3
    membership: dict[str, dict[int, str]] = {}
    for k, (train, test) in split_files(layout.split_dir).items():
        if train.is_file() and test.is_file():
            for part, path in (("train", train), ("test", test)):
                for name, _ in read_split_list(path, classes):
                    membership.setdefault(name.lower(), {})[k] = part
    prefixes = layout.prefixes
    counted = ctx.map(_count_frames, [(i, c.sources, prefixes) for i, c in enumerate(clips)], desc="checking videos")
    good, n_frames = [], {}
    for i, counts, path, why in counted:
        if why is not None:
            ctx.problem(path, why)
        else:
            good.append(clips[i])
            n_frames[clips[i].id] = counts
    splits_found = sorted({k for v in membership.values() for k in v})
    rows = []
    for c in good:
        nf = n_frames[c.id]
        rows.append({"id": c.id, "label": c.label, "label_name": classes[c.label], "split": c.split,
                     **{f"split{k}": membership.get(c.id.lower(), {}).get(k, "") for k in splits_found},
                     **c.sources, "n_visual": nf.get("visual", ""),
                     "n_flow": min(nf["flow_u"], nf["flow_v"]) if "flow_u" in nf else ""})
    columns = ["id", "label", "label_name", "split", *[f"split{k}" for k in splits_found], "visual", "flow_u",
               "flow_v", "n_visual", "n_flow"]
    write_manifest(ctx.out, rows, columns)
    write_classes(ctx.out, classes)
    summary = {"layout": ", ".join(f"{m}: {s.kind}" for m, s in layout.sources.items()), **layout.notes,
               "classes": len(classes), "split": split, "splits_in_manifest": splits_found,
               "videos": len(good), "missing_videos": len(missing), "unreadable_videos": len(clips) - len(good),
               **{f"videos_{s}": n for s, n in _counts(good).items() if s != "val"}}
    if cache:
        summary.update(write_ucf_cache(ctx, good, mods, prefixes, size, max_frames))
    return summary
