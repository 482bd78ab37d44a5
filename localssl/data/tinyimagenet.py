"""Tiny ImageNet-200 in its official layout, read from the zip or an extracted folder.

``tiny-imagenet-200/``::

    wnids.txt                          the 200 WordNet ids, one a line
    words.txt                          wnid <tab> human-readable names (all of WordNet)
    train/<wnid>/images/<wnid>_<i>.JPEG
    val/images/val_<i>.JPEG
    val/val_annotations.txt            file <tab> wnid <tab> x0 <tab> y0 <tab> x1 <tab> y1
    test/images/test_<i>.JPEG          no labels (absent from some copies)

Splits ``train``, ``val`` and ``test`` (labels -1). Classes are the wnids in
sorted order, as an ImageFolder over ``train/`` would number them. Images are
64x64; the few grayscale JPEGs become RGB. Members are read straight out of
the zip (random access), so the 250 MB archive is never extracted; a shared
subset such as ``tiny-imagenet-200-subset100.zip`` (same layout) loads the
same way, by its path or by its folder.
"""

from __future__ import annotations

from pathlib import Path

from localssl.data.base import (
    DATASETS,
    DatasetError,
    DatasetLoader,
    DatasetNotFoundError,
    DatasetSpec,
    Plan,
    Source,
    require_root,
)
from localssl.data.download import TINY_IMAGENET, fetch, not_found_message
from localssl.data.files import SizeLimit
from localssl.data.imagefolder import DirTree, FileTree, TreeSource, ZipTree, is_image_name

TOP = "tiny-imagenet-200"
FORMATS = (
    f"the official {TINY_IMAGENET.filename} (or another {TOP}*.zip with the same layout) or an "
    f"extracted {TOP}/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
    "val/val_annotations.txt"
)


#: The text files read: wnids.txt (200 lines) and val/val_annotations.txt
#: (10,000 lines, ~0.4 MB). 16 MiB leaves room for larger copies of the layout.
TEXT_LIMIT = SizeLimit(16 << 20, "a Tiny ImageNet text file")


def _text(tree: FileTree, name: str) -> str:
    if name not in tree.names:
        raise DatasetError(f"{tree.where(name)}: missing")
    ((_, data),) = tree.read_many([name], TEXT_LIMIT)
    return data.decode("utf-8", "replace")


def _prefix(tree: FileTree) -> str:
    """The folder holding ``wnids.txt`` inside the tree (``"tiny-imagenet-200/"`` in the zip)."""
    hits = sorted((n for n in tree.names if n == "wnids.txt" or n.endswith("/wnids.txt")), key=len)
    if not hits:
        raise DatasetError(f"{tree.path}: no wnids.txt; not a Tiny ImageNet layout ({FORMATS})")
    return hits[0][: -len("wnids.txt")]


def tiny_source(tree: FileTree, split: str) -> Source:
    """List one split of a Tiny ImageNet tree (labels from folder names or val annotations)."""
    pre = _prefix(tree)
    wnids_file = pre + "wnids.txt"
    wnids = [w.strip() for w in _text(tree, wnids_file).splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{tree.where(wnids_file)}: empty or repeated wnids")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    names: list[str] = []
    labels: list[int] = []
    if split == "train":
        # train/<wnid>/images/<file>
        for n in tree.names:
            if not n.startswith(pre + "train/") or not is_image_name(n):
                continue
            parts = n[len(pre) :].split("/")
            if len(parts) != 4 or parts[2] != "images":
                continue  # e.g. <wnid>_boxes.txt is not an image anyway
            if parts[1] not in index:
                raise DatasetError(f"{tree.where(n)}: class folder {parts[1]!r} is not in wnids.txt")
            names.append(n)
            labels.append(index[parts[1]])
    elif split == "val":
        ann = pre + "val/val_annotations.txt"
        present = set(tree.names)
        for lineno, line in enumerate(_text(tree, ann).splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2:
                raise DatasetError(f"{tree.where(ann)}: line {lineno} is not 'file<TAB>wnid<TAB>bbox': {line!r}")
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise DatasetError(f"{tree.where(ann)}: line {lineno}: wnid {wnid!r} is not in wnids.txt")
            member = f"{pre}val/images/{fname}"
            if member not in present:
                raise DatasetError(f"{tree.where(ann)}: line {lineno}: {tree.where(member)} is missing")
            names.append(member)
            labels.append(index[wnid])
    else:  # test: images without labels
        names = sorted(n for n in tree.names if n.startswith(pre + "test/") and is_image_name(n))
        if not names:
            raise DatasetNotFoundError(f"{tree.path}: no test/images/ here (many copies ship without it)")
        labels = [-1] * len(names)
    if not names:
        raise DatasetError(f"{tree.path}: no {split} images found")
    order = sorted(range(len(names)), key=names.__getitem__)
    return TreeSource(tree, [names[i] for i in order], [labels[i] for i in order], classes, expect_size=(64, 64))


def locate(root: Path) -> Path | list[Path]:
    """The folder or zip holding the data set, or the list of places looked at."""
    if root.is_file():
        return root if root.suffix.lower() == ".zip" else [root]
    if (root / "wnids.txt").is_file():
        return root
    if (root / TOP / "wnids.txt").is_file():
        return root / TOP
    if (root / TINY_IMAGENET.filename).is_file():
        return root / TINY_IMAGENET.filename
    zips = sorted(root.glob(f"{TOP}*.zip")) if root.is_dir() else []
    if len(zips) == 1:
        return zips[0]
    if len(zips) > 1:
        raise DatasetError(
            f"{root}: several Tiny ImageNet archives ({', '.join(z.name for z in zips)}); pass one as root"
        )
    return [root / "wnids.txt", root / TOP, root / TINY_IMAGENET.filename, root / f"{TOP}*.zip"]


class TinyImageNetLoader(DatasetLoader):
    spec = DatasetSpec(
        name="tinyimagenet",
        image_size=64,
        channels=3,
        # Per-channel pixel mean/std of the 100,000 training images.
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        num_classes=200,
        pretrain_split="train",
        probe_train_split="train",
        test_split="val",  # the test split has no public labels
        crop_scale=(0.08, 1.0),
        splits=("train", "val", "test"),
    )

    def plan(self, root: Path | None, split: str, *, download: bool) -> Plan:
        root = require_root(root, "tinyimagenet")
        found = locate(root)
        if isinstance(found, list):
            if not download:
                raise DatasetNotFoundError(not_found_message("tinyimagenet", found, FORMATS, TINY_IMAGENET, root))
            found = fetch(TINY_IMAGENET, root, looked_at=found, formats=FORMATS, name="tinyimagenet")
        path = found
        if path.is_dir():
            tree: FileTree = DirTree(path)  # listed now: its files key the cache
            files = [path / n for n in tree.names if n.endswith(".txt") or is_image_name(n)]
            return Plan(files=files, where=str(path), build=lambda: tiny_source(tree, split))
        return Plan(files=[path], where=str(path), build=lambda: tiny_source(ZipTree(path), split))


DATASETS.register("tinyimagenet")(TinyImageNetLoader())
