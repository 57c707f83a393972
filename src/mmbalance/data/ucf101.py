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
* validation: UCF-101 has none, so a stratified, seeded 10 % of the training list (docs/architecture.md, "Settled choices").

``mmbalance prepare ucf101 --root RAW --out PREP`` checks every video of the split files (a missing or empty
RGB/flow folder is listed in prepare_report.txt and skipped), writes manifest.csv (with the split of every
available split file) and classes.json, and caches up to ``max_frames`` evenly spread frames per video and
modality (uint8 ``visual.npy`` (N, F, 3, S, S), ``flow.npy`` (N, F, 2, S, S)) for
``build_ucf101(prepared=PREP)``.
"""

from __future__ import annotations

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
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import CachedClipDataset, Clip, cache_frames, clip_splits
from mmbalance.data.layout import dataset_root, option_path, prepare_clips, prepared_splits, walk_dirs
from mmbalance.data.prepare import PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

MODALITIES = ("visual", "flow")
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


def _scan(root: Path, exclude: tuple[Path, ...] = ()) -> list:
    """Every folder under root, four levels deep, and its entries; video folders (`v_*`) are never descended:
    there are 13k of them."""
    return walk_dirs(root, 4, exclude, descend=lambda name: not name.lower().startswith("v_"))


def find_split_dir(root: Path, splits_dir: str | None = None, scanned: list | None = None) -> Path:
    """The folder with classInd.txt: `splits_dir`, else found under root (ucfTrainTestlist/ as unzipped)."""
    if splits_dir:
        path = option_path(root, splits_dir)
        if not (path / "classInd.txt").is_file():
            raise DataError(f"dataset.splits_dir: {str(path / 'classInd.txt')!r} does not exist")
        return path
    found = [folder for folder, entries in (scanned or _scan(root)) if any(e.name == "classInd.txt" for e in entries)]
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


def _sources(scanned: list, names: set[str]) -> tuple[list[Source], list[Source]]:
    """Candidate RGB and flow sources among the scanned folders: a folder whose sub-folders are video folders of
    the split lists is a container; its kind is told from its name (u/v) and from one video folder's files."""
    containers = []
    for folder, entries in scanned:
        videos = {e.name.lower(): folder / e.name for e in entries if e.is_dir() and e.name.lower().startswith("v_")}
        if names.intersection(videos):
            sample = videos[sorted(names.intersection(videos))[0]]
            try:
                files = [e.name for e in os.scandir(sample) if e.is_file()]
            except OSError:
                files = []
            containers.append((folder, videos, files))
    rgb, flow = [], []
    mm_rgb: dict[Path, dict] = {}  # mmaction: per-class containers merged under their rawframes root
    mm_flow: dict[Path, dict] = {}
    uv: dict[Path, dict[str, dict]] = {}
    for folder, videos, files in containers:
        lowered = [f.lower() for f in files]
        if any(f.startswith("flow_x") for f in lowered):
            mm_flow.setdefault(folder.parent, {}).update(videos)
        if any(f.startswith("img_") for f in lowered):
            mm_rgb.setdefault(folder.parent, {}).update(videos)
        elif folder.name.lower() in ("u", "v"):
            uv.setdefault(folder.parent, {})[folder.name.lower()] = videos
        elif not any(f.startswith("flow_") for f in lowered):
            kind = "twostreamfusion jpegs_256" if _frame_style(files) == "frame000001.jpg" else "frame folders"
            if _frame_style(files) == "frame_00001.jpg":
                kind = "BalanceBenchmark frame folders"
            rgb.append(Source(kind, folder, {"visual": videos}, {"visual": ""}))
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
                  rgb_dir: str | None = None, flow_dir: str | None = None, scanned: list | None = None,
                  exclude: tuple[Path, ...] = ()) -> Layout:
    """Find the RGB and flow trees that hold the split's videos (DataError naming root when one is missing)."""
    scanned = scanned if scanned is not None else _scan(root, exclude)

    def pinned(value: str | None, option: str) -> list | None:
        path = option_path(root, value, option)
        return None if path is None else _scan(path)

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
    root = dataset_root(root, "UCF-101")
    scanned = _scan(root, exclude)
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


class Frames:
    """One modality's frame folders: RGB (one folder per video, 3 channels) or optical flow (a u and a v folder, 2
    grey channels), frame files picked by prefix (mmaction rawframes keep RGB and flow in one folder)."""

    kind = "frames"

    def __init__(self, modality: str, frames: int, size: int, prefixes: dict[str, str]):
        self.streams = ("visual",) if modality == "visual" else ("flow_u", "flow_v")
        self.mode = "RGB" if modality == "visual" else "L"
        self.frames, self.size, self.prefixes = int(frames), int(size), prefixes

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.frames, 3 if self.mode == "RGB" else 2, self.size, self.size)

    def files(self, clip: Clip) -> list[list[Path]]:
        return [media.list_frames(clip.sources[k], self.prefixes.get(k, "")) for k in self.streams]

    def images(self, files: list[list[Path]], j: int) -> list:
        """Frame j: one RGB image, or the u and v grey images (interleaved, as ClipTransform's flow_pairs)."""
        return [media.read_image(f[j], self.mode) for f in files]

    def cache_rows(self, clip: Clip, modality: str, size: int, max_frames: int) -> tuple[np.ndarray, int]:
        files = self.files(clip)
        return cache_frames(min(map(len, files)), lambda j: self.images(files, j), self.shape[1], size, max_frames)


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
        self.readers = {m: Frames(m, self.frames[m], size, self.prefixes) for m in self.modalities}
        self.cache_dir, self.rows = cache_dir, rows
        # the prepared cache (memmaps reopened in each DataLoader worker), sampled like the raw frame folders
        self.cached = None if cache_dir is None else CachedClipDataset(cache_dir, rows, self.labels, self.readers,
                                                                        train)

    def __len__(self) -> int:
        return len(self.clips)

    def _sample(self, i: int, m: str, generator: torch.Generator | None) -> list:
        """The modality's sampled frames: PIL/uint8 RGB images, or interleaved u, v grey images for flow."""
        if self.cached is not None:
            x = self.cached.frames(i, m, generator)  # (k, C, S, S) uint8
            return list(x if m == "visual" else x.reshape(-1, 1, *x.shape[-2:]))
        reader = self.readers[m]
        files = reader.files(self.clips[i])
        idx = media.segment_indices(min(map(len, files)), self.frames[m], self.train, generator)
        return [image for j in idx for image in reader.images(files, j)]

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
    if prepared is not None:
        folder = PreparedFolder(prepared, "ucf101").require()
        rows, column = folder.rows(), f"split{split}"
        if column not in rows[0]:
            have = [k[-1] for k in rows[0] if re.fullmatch(r"split\d", k)]
            raise DataError(f"dataset.prepared {str(folder.path)!r} has no split {split} (the split files prepared "
                            f"were {have}); set dataset.split to one of them")
        clips = [Clip(r["id"], int(r["label"]), r[column], {}) for r in rows if r[column] in ("train", "test")]
        classes, prefixes = folder.classes(), {}  # the cache holds decoded frames: no file names to match
    else:
        clips, classes, layout, missing = find_clips(root, split, mods, splits_dir, rgb_dir, flow_dir)
        if not clips:
            raise DataError(f"{root}: none of the videos of split {split} has all of {list(mods)}")
        if missing:
            log.warning("ucf101: %d videos of split %d have no %s frames and are left out (first: %s: %s)",
                        len(missing), split, "/".join(mods), *missing[0])
        prefixes = layout.prefixes
        log.info("ucf101: split %d, %s; %d videos, %d left out for missing frames", split,
                 ", ".join(f"{m}: {s.kind} ({s.root})" for m, s in layout.sources.items()), len(clips), len(missing))
        notes = {"layout": ", ".join(f"{m}: {s.kind}" for m, s in layout.sources.items()), **layout.notes,
                 "source": "raw", "missing_videos": len(missing), "missing_examples": [n for n, _ in missing[:5]]}
    readers = {m: Frames(m, nframes[m], image_size, prefixes) for m in mods}
    cache_dir = folder.path if prepared is not None else None

    def make(items: list[Clip], train: bool, rows) -> UCFDataset:
        return UCFDataset(items, mods, nframes, image_size, augment, train, prefixes, cache_dir, rows)

    if prepared is not None:
        splits = prepared_splits(folder, clips, classes, val_fraction=val_fraction, split_seed=split_seed,
                                 modalities=mods, notes={"split": split}, readers=readers, make=make)
    else:
        splits = clip_splits(clips, readers, classes, val_fraction=val_fraction, split_seed=split_seed,
                             notes={**notes, "split": split}, make=make)
    splits.notes["clips"] = {k: len(getattr(splits, k)) for k in ("train", "val", "test")}
    return splits


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
    # every video is in exactly one list of each split: record all splits, so one cache serves splits 1-3
    membership: dict[str, dict[int, str]] = {}
    for k, (train, test) in split_files(layout.split_dir).items():
        if train.is_file() and test.is_file():
            for part, path in (("train", train), ("test", test)):
                for name, _ in read_split_list(path, classes):
                    membership.setdefault(name.lower(), {})[k] = part
    splits_found = sorted({k for v in membership.values() for k in v})
    prefixes = layout.prefixes
    good, n_frames = [], {}
    for i, counts, path, why in ctx.map(_count_frames, [(i, c.sources, prefixes) for i, c in enumerate(clips)],
                                        desc="checking videos"):
        if why is not None:
            ctx.problem(path, why)
        else:
            good.append(clips[i])
            n_frames[clips[i].id] = counts

    def columns(c: Clip) -> dict:
        nf = n_frames[c.id]
        return {**{f"split{k}": membership.get(c.id.lower(), {}).get(k, "") for k in splits_found},
                "n_visual": nf.get("visual", ""), "n_flow": min(nf["flow_u"], nf["flow_v"]) if "flow_u" in nf else ""}

    summary = {"layout": ", ".join(f"{m}: {s.kind}" for m, s in layout.sources.items()), **layout.notes,
               "classes": len(classes), "split": split, "splits_in_manifest": splits_found,
               "videos": len(good), "missing_videos": len(missing), "unreadable_videos": len(clips) - len(good),
               **{f"videos_{s}": sum(c.split == s for c in good) for s in ("train", "test")}}
    return prepare_clips(ctx, "ucf101", good, dict.fromkeys(layout.prefixes, "jpgdir"), classes, summary=summary,
                         problems=missing, columns=columns, size=size, max_frames=max_frames,
                         cache_readers=(lambda kinds, clips: {m: Frames(m, 1, size, prefixes) for m in mods})
                         if cache else None)
