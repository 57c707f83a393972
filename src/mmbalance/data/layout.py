"""The clip-dataset skeleton: what every audio-visual loader does that is not its own.

A dataset module (cremad, kinetics_sounds, vggsound, balanced_av, ucf101) keeps its layout table, its clip list
(split files, csv, json) with its label parsing and split rules, and its recipes (readers). The rest is here: the
root and path options; `find_media`, which resolves the layout tables for a listed clip set into a `Discovery`;
the builder `build_clips` (a prepared folder or the raw tree); the one `prepare()` skeleton, `prepare_clips`.

A layout table lists per modality ``((kind, (folder, ...)), ...)`` in priority order, `{split}` in a folder
standing for the clip's split, e.g. ``(("jpgdir", ("visual", "frames")), ("video", ("{split}",)))``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import (SPLITS, AudioReader, Clip, FrameReader, cache_files, clip_splits, sources_digest,
                                  write_clip_cache)
from mmbalance.data.prepare import (CACHE_META, MANIFEST, PREPARERS, REPORT, STATUS, SUMMARY, PreparedFolder,
                                    builder, resolve, resolve_prepared)
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

# file-name suffixes per media kind; a frame folder may be named `<id>.mp4` (OGM-GE's VGGSound frame extractor)
KIND_SUFFIXES = {"jpgdir": ("", ".mp4"), "hdf5": (".hdf5", ".h5"), "video": (".mp4", ".mkv", ".webm", ".avi", ".flv"),
                 "array": (".npy", ".pkl", ".pt"), "wav": (".wav",)}
# where raw downloads keep their videos (`{split}` = the clip's split)
VIDEO_FOLDERS = ("{split}", "train", "val", "validate", "test", "videos", "video", "mp4")
# files that mark a folder as mmbalance output (a prepared folder), never raw data to detect; prepare writes
# STATUS before anything else, so a folder it is still writing (or that it stopped writing) is one too
PREPARED_MARKERS = (STATUS, MANIFEST, CACHE_META, SUMMARY)
# what extract_media decoded the videos with, per modality (the last complete run's options; loaders compare the
# frame rate with the config's)
EXTRACTED = "extract.json"
# one record per extracted output, `extract/<output path>.json`: the source it was decoded from (absolute path, size,
# modification time) and the options; an output whose record differs from this prepare's is decoded again
RECORDS = "extract"

Table = Sequence[tuple[str, Sequence[str]]]  # ((kind, folders), ...) in priority order


# ---------------------------------------------------------------------------------------------------------------
# the root and path options


def option_path(root: Path, value, option: str | None = None, what: str = "folder") -> Path | None:
    """A path option (relative to `root`, or absolute); None when unset. With `option`, it must exist: a folder
    when `what` is 'folder', else a file (DataError "dataset.<option>: <what> '<path>' does not exist")."""
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if option and not (path.is_dir() if what == "folder" else path.is_file()):
        raise DataError(f"dataset.{option}: {what} {str(path)!r} does not exist")
    return path


def dataset_root(root, dataset: str) -> Path:
    if root in (None, ""):
        raise UserError(f"{dataset}: dataset.root is not set (set dataset.root=... or paths.data_dir=..., or "
                        "dataset.prepared)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"{dataset}: dataset root {str(path)!r} is not a folder (set dataset.root=... or "
                        "paths.data_dir=...)")
    return path


def walk_dirs(root: Path, depth: int, exclude: Sequence[Path] = (), descend: Callable[[str], bool] = lambda n: True
              ) -> list[tuple[Path, list[os.DirEntry]]]:
    """(folder, its entries) for root and its sub-folders down to `depth` levels, breadth first and sorted by
    name, without hidden folders, mmbalance prepared folders (a half-written --out inside the root included),
    `exclude`, and folders whose name `descend` refuses."""
    excluded = {Path(p).resolve() for p in exclude}
    out, level = [], [root]
    for d in range(depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            if folder != root and any(e.name in PREPARED_MARKERS for e in entries):
                continue
            out.append((folder, entries))
            if d < depth:
                nxt += [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
                        and descend(e.name) and Path(e.path).resolve() not in excluded]
        level = nxt
    return out


# ---------------------------------------------------------------------------------------------------------------
# layout tables


@dataclass(frozen=True)
class Candidate:
    """A place a clip's media may be: `<folder>/<clip name><suffix>` (a folder for kind jpgdir)."""

    folder: str  # relative to the root, or absolute; `{split}` is replaced by the clip's split
    suffix: str
    kind: str  # jpgdir | hdf5 | video (visual); array | wav | video (audio)

    @property
    def is_dir(self) -> bool:
        return self.kind == "jpgdir"

    def folder_for(self, root: Path, split: str) -> Path:
        path = Path(self.folder.format(split=split))
        return path if path.is_absolute() else root / path


Candidates = list[tuple[str, list[Candidate]]]  # [(kind, candidates)] in priority order


def candidate_list(table: Table, override: str | Path | None = None) -> Candidates:
    """A layout table's candidates; `override` (a user's visual_dir/audio_dir) replaces its folders."""
    return [(kind, [Candidate(str(f), s, kind) for f in ([override] if override else folders)
                    for s in KIND_SUFFIXES[kind]]) for kind, folders in table]


class DirIndex:
    """Lists every probed folder once (name -> is a folder), so resolving 200k clips costs set intersections,
    not 200k x candidates stat calls (VGGSound folders hold ~200k entries)."""

    def __init__(self):
        self._listing: dict[Path, dict[str, bool]] = {}
        self._stems: dict[tuple, set[str]] = {}

    def listing(self, folder: Path) -> dict[str, bool]:
        if folder not in self._listing:
            entries: dict[str, bool] = {}
            with contextlib.suppress(OSError), os.scandir(folder) as it:  # a missing folder lists nothing
                for entry in it:
                    with contextlib.suppress(OSError):
                        entries[entry.name] = entry.is_dir()
            self._listing[folder] = entries
        return self._listing[folder]

    def stems(self, folder: Path, suffix: str, is_dir: bool) -> set[str]:
        key = (folder, suffix, is_dir)
        if key not in self._stems:
            n = len(suffix)
            # a .tmp folder is an extraction that did not finish
            self._stems[key] = {name[:len(name) - n] for name, d in self.listing(folder).items()
                                if d == is_dir and name.endswith(suffix) and len(name) > n
                                and not name.endswith(".tmp")}
        return self._stems[key]


def shown(folder: Path, root: Path) -> str:
    try:
        return str(folder.relative_to(root)) or "."
    except ValueError:
        return str(folder)


def describe(cand: Candidate, root: Path) -> str:
    return f"{shown(cand.folder_for(root, '{split}'), root)}/<id>{cand.suffix}" + ("/" if cand.is_dir else "")


def first_present(root: Path, table: Candidates, index: DirIndex) -> Candidate | None:
    """The first candidate folder that holds any media of its kind (for trees whose clips come from the media)."""
    return next((c for _, cands in table for c in cands
                 if index.stems(c.folder_for(root, ""), c.suffix, c.is_dir)), None)


@dataclass
class Resolved:
    """Where one modality's media were found: the kind, a path per clip (None = missing), and each (candidate,
    folder) that held any, in the order found."""

    kind: str
    paths: list[str | None]
    hits: list[tuple[Candidate, Path]] = field(default_factory=list)

    @property
    def found(self) -> int:
        return sum(p is not None for p in self.paths)


def resolve_modality(root: Path, clips: Sequence[Clip], names: Sequence[Sequence[str]], priority: Candidates,
                     index: DirIndex) -> Resolved:
    """For each kind, union its candidate folders (first hit per clip wins); keep the kind that finds the most
    clips (on a tie the earlier kind). `names[i]` are clip i's accepted file names (VGGSound: plain and
    zero-padded start)."""
    by_split: dict[str, dict[str, list[int]]] = {}
    for i, (clip, clip_names) in enumerate(zip(clips, names)):
        wanted = by_split.setdefault(clip.split, {})
        for name in clip_names:
            wanted.setdefault(name, []).append(i)
    results = []
    for kind, cands in priority:
        found = Resolved(kind, [None] * len(clips))
        for cand in cands:
            for split, wanted in by_split.items():
                folder = cand.folder_for(root, split)
                common = wanted.keys() & index.stems(folder, cand.suffix, cand.is_dir)
                hit, prefix = False, str(folder) + os.sep  # plain strings: 200k Paths are slow
                for name in sorted(common):  # sorted: the same file wins on every run
                    for i in wanted[name]:
                        if found.paths[i] is None:
                            found.paths[i], hit = prefix + name + cand.suffix, True
                if hit:
                    found.hits.append((cand, folder))
        results.append(found)
    return max(results, key=lambda r: r.found)  # on a tie, the earlier kind


@dataclass
class Discovery:
    """The clips of a raw tree: which layout matched, the complete clips, and the ones left out."""

    dataset: str
    layout: str
    split_source: str
    classes: list[str]
    clips: list[Clip]  # every modality found
    kinds: dict[str, str]  # modality -> media kind
    where: dict[str, str]  # modality -> description of the folders used
    missing: list[tuple[Clip, list[tuple[str, str]]]] = field(default_factory=list)  # clip, [(modality, path)]
    total: int = 0
    extra_notes: dict = field(default_factory=dict)
    dirs: dict[str, list[Path]] = field(default_factory=dict)  # modality -> folders that held its media

    def notes(self) -> dict:
        found = {s: sum(c.split == s for c in self.clips) for s in SPLITS}
        lost = {s: sum(c.split == s for c, _ in self.missing) for s in SPLITS}
        return {"layout": self.layout, "split_source": self.split_source,
                "sources": {m: f"{k}: {self.where[m]}" for m, k in self.kinds.items()}, "clips_listed": self.total,
                "clips": {s: n for s, n in found.items() if n}, "missing_clips": len(self.missing),
                "missing_by_split": {s: n for s, n in lost.items() if n},
                "missing_by_modality": {m: sum(m in dict(lack) for _, lack in self.missing) for m in self.kinds},
                "missing_examples": [lack[0][1] for _, lack in self.missing[:10]], **self.extra_notes}

    def problems(self) -> list[tuple[str, str]]:
        """One (path, why) per clip left out, naming its first missing file (prepare_report.txt)."""
        return [(lack[0][1], f"clip {clip.id} ({', '.join(m for m, _ in lack)}): missing: no "
                             f"{' or '.join(f'{m} ({self.kinds[m]})' for m, _ in lack)} file")
                for clip, lack in self.missing]

    def log(self) -> None:
        log.info("%s: layout %s (%s); %s; %d of %d listed clips found, %d missing", self.dataset, self.layout,
                 self.split_source, "; ".join(f"{m} {k} in {self.where[m]}" for m, k in self.kinds.items()),
                 len(self.clips), self.total, len(self.missing))
        for clip, lack in self.missing[:5]:
            log.warning("%s: clip %s left out: no %s", self.dataset, clip.id, ", ".join(f"{m} ({p})" for m, p in lack))


def find_media(root: Path, entries: Sequence[Clip], names: Sequence[Sequence[str]] | None,
               tables: dict[str, Candidates], *, layout: str | Callable[[dict], str], split_source: str, dataset: str,
               classes: list[str], drop_duplicates: bool = False) -> Discovery:
    """Resolve every modality (`tables`, in the fusion order) of every listed clip; clips lacking a modality are
    counted as missing. `names`: each clip's accepted file names (default: its id). `layout`: the layout's name,
    or a function of the media kinds found that names it. `drop_duplicates` (split lists that may repeat a clip):
    a clip listed again with the same split and label is kept once and the notes count the repeats
    (`duplicates_dropped`); one listed with another split or label is a DataError naming it and both listings,
    since keeping either would put a test clip into training or train on a wrong label."""
    names = names or [[e.id] for e in entries]
    listed = len(entries)
    if drop_duplicates:
        first_at: dict[str, int] = {}
        for i, entry in enumerate(entries):
            j = first_at.setdefault(entry.id, i)
            a = entries[j]
            if (a.split, a.label) != (entry.split, entry.label):
                differ = " and ".join(w for w, d in (("splits", a.split != entry.split),
                                                     ("labels", a.label != entry.label)) if d)
                raise DataError(f"{dataset}: clip {entry.id!r} is listed twice in {split_source} with different "
                                f"{differ}: as {a.split} {classes[a.label]!r} and as {entry.split} "
                                f"{classes[entry.label]!r}; a clip belongs to one split with one label (a test clip "
                                "listed for training would leak into it): fix the lists")
        entries, names = [entries[i] for i in first_at.values()], [names[i] for i in first_at.values()]
    index = DirIndex()
    resolved = {m: resolve_modality(root, entries, names, table, index) for m, table in tables.items()}
    empty = [m for m, r in resolved.items() if r.found == 0]
    if empty:
        looked = "; ".join(f"{m} {k}: " + ", ".join(dict.fromkeys(describe(c, root) for c in cands))
                           for m in empty for k, cands in tables[m])
        named = f" ({layout} layout)" if isinstance(layout, str) else ""  # a function names it from the media found
        raise DataError(f"{root}: no {dataset} media: no {' or '.join(empty)} file for any of the {len(entries)} "
                        f"clips listed in {split_source}{named}; looked for {looked}")
    first = {m: r.hits[0][0] for m, r in resolved.items()}  # a missing file is named after the first folder used
    clips, missing = [], []
    for i, entry in enumerate(entries):
        lack = [(m, str(first[m].folder_for(root, entry.split) / (names[i][0] + first[m].suffix)))
                for m, r in resolved.items() if r.paths[i] is None]
        if lack:
            missing.append((entry, lack))
        else:
            clips.append(Clip(entry.id, entry.label, entry.split, {m: r.paths[i] for m, r in resolved.items()}))
    kinds = {m: r.kind for m, r in resolved.items()}
    where = {m: ", ".join(dict.fromkeys(describe(c, root) for c, _ in r.hits)) for m, r in resolved.items()}
    return Discovery(dataset, layout if isinstance(layout, str) else layout(kinds), split_source, classes, clips,
                     kinds, where, missing, len(entries),
                     extra_notes={"duplicates_dropped": listed - len(entries)} if drop_duplicates else {},
                     dirs={m: list(dict.fromkeys(folder for _, folder in r.hits)) for m, r in resolved.items()})


# ---------------------------------------------------------------------------------------------------------------
# the prepared folder -> DataSplits


# recipe attributes (FrameReader / AudioReader `cache_recipe`, extract.json): what a refusal calls them, and the
# options that set them, tried in order against the dataset builder's (dataset.X) and the preparer's (--set X)
# signatures
RECIPE_OPTIONS = {"size": ("frame size", ("image_size", "size")),
                  "fps": ("frame rate of the videos", ("video_fps", "fps", "extract_fps")),
                  "flow": ("optical flow", ()), "source": ("media kind", ()), "recipe": ("audio recipe", ()),
                  "sr": ("sample rate", ("sample_rate", "sr")), "seconds": ("seconds", ("clip_seconds", "seconds")),
                  "n_fft": ("STFT size", ("n_fft",)), "hop_length": ("STFT hop", ("hop_length",)),
                  "pad_mode": ("STFT padding", ("pad_mode",)), "num_mel_bins": ("mel bins", ("num_mel_bins",)),
                  "target_frames": ("fbank frames", ("audio_target_frames",)),
                  "frames": ("spectrogram width", ("audio_frames",))}


def _same(a, b) -> bool:
    """Recipe values equal as json keeps them (3 == 3.0; a tuple is a list)."""
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)]
    if all(numbers):
        return float(a) == float(b)
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def recipe_differences(folder: PreparedFolder, meta: dict | None, used: dict, config: dict | None
                       ) -> list[tuple[str, str, object, object]]:
    """(modality, recipe attribute, prepared value, this config's value) wherever the prepared data were made with
    another recipe than this config computes: the cache's frame size against the frame readers `used`; with
    `config` (the readers the config decodes the raw media with), every attribute of the cache's recorded recipe
    and the frame rate videos were extracted at (extract.json)."""
    out = []
    if meta is not None:
        out += [(m, "size", meta.get("size"), r.size) for m, r in used.items()
                if r.kind == "frames" and not _same(meta.get("size"), r.size)]
    if not config:
        return out
    recorded = dict(((meta or {}).get("recipe") or {}))
    extracted = folder.json(EXTRACTED, optional=True)
    for m, reader in config.items():
        made = extracted.get(m) or {}
        if "fps" in made and reader.kind == "frames":
            recorded[m] = {**recorded.get(m, {}), "fps": made["fps"]}
        if "sample_rate" in made and reader.kind == "spectrogram" and getattr(reader, "source", "") != "array":
            # wav extracted at another rate would be resampled to the config's on reading: other inputs
            recorded[m] = {**recorded.get(m, {}), "sr": made["sample_rate"]}
        out += [(m, k, v, getattr(reader, k, None)) for k, v in recorded.get(m, {}).items()
                if not _same(v, getattr(reader, k, None))]
    return out


def refuse_other_recipe(folder: PreparedFolder, differences: list) -> None:
    """One DataError naming every option in which the prepared folder differs from the config, and what to do."""
    def parameters(fn: Callable | None) -> list[str]:
        return list(inspect.signature(fn).parameters) if fn is not None else []

    known = folder.dataset in PREPARERS
    built, options = (parameters(builder(folder.dataset)), parameters(resolve(folder.dataset))) if known else ([], [])
    lines, sets = [], {}
    for m, k, prepared, wanted in differences:
        what, names = RECIPE_OPTIONS.get(k, (k, ()))
        option = next((f"dataset.{n}" for n in names if n in built), k)
        lines.append(f"  {m}: {option} ({what}) {json.dumps(prepared)} there, {json.dumps(wanted)} in this config")
        name = next((n for n in names if n in options), None)
        if name is not None and wanted is not None:
            sets[name] = wanted
    redo = (f"`mmbalance prepare {folder.dataset or 'DATASET'} --root RAW --out NEW_FOLDER"
            + "".join(f" --set {k}={v}" for k, v in sets.items()) + "` and set dataset.prepared=NEW_FOLDER")
    raise DataError(f"dataset.prepared {str(folder.path)!r} was prepared with another recipe than this config asks "
                    "for, so it would train on other inputs than the config records:\n" + "\n".join(lines)
                    + f"\nPrepare a folder for this config ({redo}), set these dataset options to the prepared "
                    "values, or set dataset.prepared=null to decode the raw tree")


def prepared_splits(folder: PreparedFolder, clips: list[Clip], classes: list[str], *, val_fraction: float,
                    split_seed: int, modalities: Sequence[str] = ("audio", "visual"), frames: int = 3,
                    image_size: int = 224, augment: str = "none", notes: dict | None = None,
                    decode: Callable[[], dict] | None = None, readers: dict | None = None,
                    recipe: Callable[[], dict] | None = None) -> DataSplits:
    """DataSplits over a prepared folder: its memory-mapped clip cache (no decoding) when it has one, else
    `decode()` readers on the files prepare extracted (DataError when there is neither). `readers`: a dataset's
    own readers of the cache. `recipe()`: the readers this config decodes the raw media with (by the manifest's
    media kinds), compared with the recipe the folder was prepared with (`recipe_differences`); without it only the
    cache's frame size is compared. A folder prepared with another recipe is refused, never used as if it were
    this config's (`refuse_other_recipe`)."""
    meta = folder.cache_meta(required=decode is None)
    notes = {"layout": "prepared", "source": "prepared", "prepared": str(folder.path),
             "source_layout": folder.summary.get("layout"), "missing_clips": folder.summary.get("missing_clips"),
             "clips": {s: sum(c.split == s for c in clips) for s in SPLITS}, "cache": meta is not None,
             **(notes or {})}
    config = recipe() if recipe is not None else readers
    if meta is not None:
        specs = meta["modalities"]
        lacking = [m for m in modalities if m not in specs]
        if lacking:
            raise DataError(f"dataset.prepared {str(folder.path)!r} has no {lacking} cache (it holds "
                            f"{sorted(specs)}); prepare again with those modalities")
        readers = readers or {m: FrameReader(frames=frames, size=image_size, augment=augment)
                              if specs[m]["kind"] == "frames" else AudioReader(source="array", shape=specs[m]["shape"])
                              for m in modalities}
        if "recipe" not in meta:  # written before cache.json recorded it: only the frame size can be checked
            log.warning("%s: %s does not record the recipe its cache was made with (an earlier mmbalance wrote it); "
                        "prepare it again to have it checked against the config", folder.path, CACHE_META)
        # clips the cache lacks are counted (notes["uncached_clips"]) and logged by clip_splits
        notes.update(cache_frame_size=meta.get("size"), cache_max_frames=meta.get("max_frames"),
                     cache_recipe=meta.get("recipe"))
    else:
        readers = decode()
    differences = recipe_differences(folder, meta, readers, {m: r for m, r in (config or {}).items()
                                                             if m in readers})
    if differences:
        refuse_other_recipe(folder, differences)
    for m, made in folder.json(EXTRACTED, optional=True).items():
        side, size = (made or {}).get("short_side") or 0, getattr(readers.get(m), "size", 0)
        if 0 < side < size:  # a prepare option, not a config one: the frames are blurred, not refused
            log.warning("%s: the %s frames were extracted with short_side %s, smaller than the %s px this config "
                        "reads: they are upscaled", folder.path, m, side, size)
    log.info("%s: prepared folder %s (%s), %d clips", folder.dataset, folder.path,
             "cache" if meta else "decoded on access", len(clips))
    return clip_splits(clips, readers, classes, val_fraction=val_fraction, split_seed=split_seed,
                       cache_dir=folder.path if meta else None, notes=notes)


def build_clips(dataset: str, root, prepared, discover: Callable[[], Discovery],
                readers: Callable[[dict[str, str], list[Clip]], dict], *, val_fraction: float, split_seed: int,
                frames: int = 3, image_size: int = 224, augment: str = "crop_flip", notes: dict | None = None,
                decode_prepared: bool = True) -> tuple[DataSplits, dict[str, str]]:
    """The builder of an audio-visual clip dataset, and each modality's media kind: the folder `mmbalance prepare`
    wrote (`prepared`; 'auto' = ROOT/mmbalance_prepared once prepare finished there) read from its clip cache, or
    its extracted files decoded with `readers` (`decode_prepared`); else the raw tree `discover()` finds, decoded
    on access by `readers(kinds, clips)`. `notes`: the raw path's own notes."""
    folder = resolve_prepared(root, prepared, dataset)
    if folder is not None:
        folder = PreparedFolder(folder, dataset).require()
        rows = folder.rows(["id", "label", "split", "audio", "visual", "audio_kind", "visual_kind"])
        classes, kinds = folder.classes(), {m: rows[0][f"{m}_kind"] for m in ("audio", "visual")}
        clips = []
        for row in rows:  # a relative source is inside the prepared folder
            label = int(row["label"])
            if not 0 <= label < len(classes):
                raise DataError(f"{folder.path / MANIFEST}: clip {row['id']!r} has label {label}, but classes.json "
                                f"lists {len(classes)} classes")
            sources = {m: str(p if (p := Path(row[m])).is_absolute() else folder.path / p) for m in kinds}
            clips.append(Clip(row["id"], label, row["split"], sources))
        return prepared_splits(folder, clips, classes, val_fraction=val_fraction, split_seed=split_seed,
                               frames=frames, image_size=image_size, augment=augment, notes={"sources": kinds},
                               decode=(lambda: readers(kinds, clips)) if decode_prepared else None,
                               recipe=lambda: readers(kinds, clips)), kinds
    found = discover()
    found.log()
    return clip_splits(found.clips, readers(found.kinds, found.clips), found.classes, val_fraction=val_fraction,
                       split_seed=split_seed, notes={**found.notes(), **(notes or {})}), found.kinds


# ---------------------------------------------------------------------------------------------------------------
# prepare


def parse_shard(shard) -> tuple[int, int] | None:
    """'i/n' -> (i, n): the i-th (0-based) of n interleaved shards of the clip list."""
    if shard in (None, "", False):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"prepare --set shard={shard!r}: expected i/n with 0 <= i < n, e.g. shard=0/4")
    return int(m.group(1)), int(m.group(2))


def source_record(video: str, recipe: dict) -> dict:
    """What an output decoded from `video` with `recipe` is made from, as its record keeps it (json values)."""
    try:
        st = os.stat(video)
    except OSError as exc:
        raise DataError(f"cannot read video {video!r}: {exc}") from None
    return {"source": os.path.abspath(video), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "recipe": recipe}


def _read_record(path: str) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _extract_one(task: tuple) -> tuple[int, str | None, str | None, str | None, list[str], list[str]]:
    """Worker: one clip's video decoded into each target by its writer, which writes to a temporary name and
    renames, so an output that exists is complete. It is kept only when its record (`RECORDS`) says it was decoded
    from this very file (path, size, modification time) with these options; otherwise it is decoded again and the
    record written after it (a run stopped in between leaves no valid record: the next one decodes it again).
    Returns (index, failing modality, path and error, or None, names of the outputs written, why each existing
    output was decoded again)."""
    i, jobs, params = task
    wrote, redone = [], []
    for m, name, write, video, dest, record_path, recipe, force in jobs:
        try:
            wanted = source_record(video, recipe)
            exists = os.path.exists(dest)
            record = _read_record(record_path) if exists else None
            if exists and not force and record == wanted:
                continue
            if exists and not force:  # no record: an interrupted run or an earlier mmbalance
                redone.append("unrecorded" if record is None else
                              "other_options" if record.get("recipe") != wanted["recipe"] else "other_source")
            Path(record_path).unlink(missing_ok=True)
            write(video, dest, *params)
            PreparedFolder(Path(record_path).parent).write_json(Path(record_path).name, wanted)
            wrote.append(name)
        except DataError as exc:
            return i, m, video, str(exc), wrote, redone
    return i, None, None, None, wrote, redone


# a writer decodes `video` into `dest`, replacing it (`_extract_one` decides which outputs are redone)
def write_wav(video: str, dest: str, sr: int, fps: float, short_side: int) -> None:
    media.extract_wav(video, dest, sr)


def write_frames(video: str, dest: str, sr: int, fps: float, short_side: int) -> None:
    media.extract_frames(video, dest, fps, short_side)


# modality -> (output name, writer, kind written, path under --out): the default extraction from video, with
# params (sample rate, fps, short side)
WAV_AND_FRAMES = {"audio": ("audio", write_wav, "wav", "audio/{id}.wav"),
                  "visual": ("frames", write_frames, "jpgdir", "frames/{id}")}


def extraction_recipe(target: tuple, params: tuple) -> dict:
    """What one `targets` entry decodes a modality's videos with, as extract.json records it: the default writers'
    parameters by name (`WAV_AND_FRAMES`' order: sample rate, fps, short side), a dataset's own writer's as given."""
    name, write = target[0], target[1]
    if write is write_wav:
        return {"writer": name, "sample_rate": params[0]}
    if write is write_frames:
        return {"writer": name, "fps": params[1], "short_side": params[2]}
    return {"writer": name, "params": list(params)}


def extract_media(ctx, clips: list[Clip], kinds: dict[str, str], *, targets: dict = WAV_AND_FRAMES,
                  params: tuple = (), complete: bool = True) -> tuple[list[Clip], dict[str, str], dict]:
    """For every modality read from video (kind 'video'): decode each clip once into `targets[modality]` under
    ctx.out (in parallel). A video that fails to decode is recorded with ctx.problem and its clip dropped. An
    existing output is kept only when its record is this prepare's (`_extract_one`), so shards and complete runs
    never mix two recipes or two sources (docs/datasets.md, "Resumable, never mixed"). extract.json records the
    options of the last complete run (`complete`: not a shard), which a loader compares with its config."""
    todo = {m: t for m, t in targets.items() if kinds.get(m) == "video"}
    if not todo:
        return clips, kinds, {}
    out = Path(ctx.out)
    folder = PreparedFolder(out)
    before = folder.json(EXTRACTED, optional=True)
    recipe = json.loads(json.dumps({m: extraction_recipe(t, params) for m, t in todo.items()}))
    for m in sorted(m for m in todo if m in before and before[m] != recipe[m]):
        log.warning("%s: %s was extracted with %s; this prepare asks for %s: every clip's %s decoded with other "
                    "options is extracted again", out, m, before[m], recipe[m], m)
    dests = [{m: str(out / path.format(id=c.id)) for m, (_, _, _, path) in todo.items()} for c in clips]
    tasks = [(i, [(m, name, write, c.sources[m], dests[i][m],
                   str(out / RECORDS / f"{path.format(id=c.id)}.json"), recipe[m], bool(ctx.force))
                  for m, (name, write, _, path) in todo.items()], params) for i, c in enumerate(clips)]
    stats = {**{f"{t[0]}_extracted": 0 for t in todo.values()}, "extracted": 0, "extract_skipped_existing": 0,
             "extract_redone": 0, "extract_failed": 0}
    why: dict[str, int] = {}
    kept = []
    for i, m, bad_path, error, wrote, redone in ctx.map(_extract_one, tasks, desc="extracting media"):
        for reason in redone:
            why[reason] = why.get(reason, 0) + 1
        stats["extract_redone"] += bool(redone)
        if error is not None:
            ctx.problem(bad_path, f"clip {clips[i].id} ({m}): {error}")
            stats["extract_failed"] += 1
            continue
        for name in wrote:
            stats[f"{name}_extracted"] += 1
        stats["extracted" if wrote else "extract_skipped_existing"] += 1
        kept.append(Clip(clips[i].id, clips[i].label, clips[i].split, {**clips[i].sources, **dests[i]}))
    if why:
        stats["extract_redone_why"] = why
        log.warning("%s: %d clips' outputs existed but were decoded again (outputs by reason: %s): made with other "
                    "options, from another source file, or without a record", out, stats["extract_redone"],
                    ", ".join(f"{k} {v}" for k, v in sorted(why.items())))
    stats["extract_options"] = recipe
    if complete:
        folder.write_json(EXTRACTED, {**before, **recipe})
    return kept, {**kinds, **{m: t[2] for m, t in todo.items()}}, stats


def name_clip(path: str, why: str) -> str:
    """A report reason that names the clip of the media file or folder `path` (its name without a media suffix:
    media are named by clip id); one that already speaks of a clip is kept as it is."""
    if re.search(r"\bclip\b", why):
        return why
    name = Path(str(path)).name
    suffix = max((x for xs in KIND_SUFFIXES.values() for x in xs if x and name.endswith(x) and len(name) > len(x)),
                 key=len, default="")
    return f"{why} (clip {name[:len(name) - len(suffix)]})"


def prepare_clips(ctx, dataset: str, clips: list[Clip], kinds: dict[str, str], classes: list[str], *,
                  summary: dict, problems: Sequence[tuple[str, str]] = (),
                  cache_readers: Callable[[dict[str, str], list[Clip]], dict] | None, size: int = 224,
                  max_frames: int = 10, recipe: dict | None = None, columns: Callable[[Clip], dict] | None = None,
                  shard=None, **extraction) -> dict:
    """The one `prepare()` skeleton of the clip datasets:

    1. every missing or unreadable file found while listing the clips -> prepare_report.txt (skipped, counted);
    2. modalities read from video are decoded once (`extract_media`; `shard=i/n` extracts only every n-th clip
       from the i-th and stops there: run the shards anywhere, then once without shard);
    3. classes.json, manifest.csv (id, label, split, label_name, one path and kind per modality, `columns`
       extras) and recipe.json;
    4. with `cache_readers`, the memory-mapped clip cache (`size` px frames, up to `max_frames` per clip);
       without, a cache an earlier prepare left is kept only while it holds exactly these clips' media.
    Returns the summary (printed and saved as prepare_summary.json by the command).
    """
    for path, why in problems:
        ctx.problem(path, why)
    # every line of the report names its clip: a dataset's own reasons that do not are given it here
    ctx.problems[:] = [(path, name_clip(path, why)) for path, why in ctx.problems]
    ctx.folder.write_classes(classes)
    part = parse_shard(shard)
    if part is not None:
        i, n = part
        _, _, stats = extract_media(ctx, clips[i::n], kinds, complete=False, **extraction)
        return {**summary, **stats, "shard": f"{i}/{n}", "shard_clips": len(clips[i::n]),
                "next_step": f"when every shard is done, run `mmbalance prepare {dataset}` again without shard: it "
                             "skips what was extracted and writes manifest.csv and the cache"}
    listed = len(clips)
    clips, kinds, stats = extract_media(ctx, clips, kinds, **extraction)
    if not clips:  # run_prepare writes the report also when this stops it
        raise DataError(f"{dataset}: no usable clip under {str(ctx.root)!r} ({listed} clips listed, "
                        f"{len(ctx.problems)} missing or unreadable files skipped); the reasons are listed in "
                        f"{ctx.out / REPORT}")
    out = Path(ctx.out).resolve()

    def rel(path: str) -> str:  # inside the prepared folder: relative, so the folder can be moved
        full = Path(path).resolve()
        return str(full.relative_to(out) if full.is_relative_to(out) else full)

    mods = list(kinds)
    rows = [{"id": c.id, "label": c.label, "split": c.split, "label_name": classes[c.label],
             **{m: rel(c.sources[m]) for m in mods}, **{f"{m}_kind": kinds[m] for m in mods},
             **(columns(c) if columns else {})} for c in clips]
    ctx.folder.write_manifest(rows, list(rows[0]))
    if recipe is not None:
        ctx.folder.write_json("recipe.json", recipe)
    summary = {**summary, **stats, "prepared_formats": kinds,
               "manifest_clips": {s: sum(c.split == s for c in clips) for s in SPLITS}}
    if cache_readers is not None:
        summary.update(write_clip_cache(ctx, clips, cache_readers(kinds, clips), size=int(size),
                                        max_frames=int(max_frames)))
    elif (kept := drop_stale_cache(ctx.folder, clips)) is not None:
        summary["cache"] = kept
    return summary


def drop_stale_cache(folder: PreparedFolder, clips: list[Clip]) -> str | None:
    """A prepare without a cache leaves the clip cache an earlier one wrote only when it holds exactly these clips
    and media (its recipe is in its cache.json, which loaders check); otherwise the cache belongs to a manifest
    that is gone, and a loader would read it for the new one: its files are removed, with a warning."""
    meta = folder.cache_meta(required=False)
    if meta is None:
        return None
    if meta.get("ids") == [c.id for c in clips] and meta.get("sources") == sources_digest(clips):
        return "kept: the cache an earlier prepare wrote holds these clips' media"
    for name in cache_files(meta):
        (folder.path / name).unlink(missing_ok=True)
    log.warning("%s: removed the clip cache an earlier prepare wrote (it holds other clips or media than this "
                "manifest lists); prepare with --set cache=true to write one", folder.path)
    return "removed: it held other clips or media than this manifest"


def prepare_discovered(ctx, dataset: str, found: Discovery, *, summary: dict | None = None, **options) -> dict:
    """`prepare_clips` for the clips `find_media` discovered in a raw tree: its notes open the summary (then
    `summary`), and every clip it left out for a missing file is reported."""
    return prepare_clips(ctx, dataset, found.clips, found.kinds, found.classes, problems=found.problems(),
                         summary={**found.notes(), **(summary or {})}, **options)


def wav_and_frames(kinds: dict[str, str], audio_recipe: dict, sample_rate: int, fps: float, short_side) -> dict:
    """`prepare_clips`' `params` of the `WAV_AND_FRAMES` writers and its recipe.json: the audio recipe (or a
    stored array, used as it is; the vggsound loader reads it back) and the frame rate."""
    audio = audio_recipe if kinds["audio"] != "array" else {"recipe": "stored array"}
    params = (int(sample_rate), float(fps), int(short_side or 0))  # write_wav's and write_frames' order
    return {"recipe": {"audio": audio, "visual": {"fps": fps}}, "params": params}
