"""Pack an image dataset into WebDataset shards + DALI indices + ``manifest.json``.

Usage::

    python -m data_tools.pack SOURCE OUT_DIR [options]

SOURCE is one of

- an image-folder tree ``[split/][group folders/]class/image`` (class = parent folder name; top-level
  ``train``/``val``/``valid``/``test`` folders are kept as the splits);
- an image root with ``--labels-csv FILE --image-col COL --label-cols A[,B,...] [--split-col COL]``
  (one column of class names = single-label, several 0/1 columns = multi-label);
- an image root with ``--nih-list [SPLIT=]FILE`` (repeatable): NIH ChestX-ray14 ``name l1 .. l14`` lists;
- a MedMNIST-style ``.npz`` file (``train_images``/``train_labels``, ``val_*``, ``test_*``).

Sources without splits (or with ``--resplit``) get seeded, stratified train/val/test splits
(``--split-fractions``, ``--seed``), group-disjoint with ``--group-by`` (see `data_tools.splits`).
Colour handling is described in `data_tools.imaging`.  Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

from data_tools.cli import add_common_args, comma_list, positive_int, run
from data_tools.errors import BadImage, PackError
from data_tools.imaging import IMAGE_MODES, probe
from data_tools.labelfiles import csv_source, nih_source, parse_nih_list
from data_tools.parallel import parallel_map
from data_tools.records import SPLITS, Record
from data_tools.shards import EncodeOptions, LabelSpace
from data_tools.sources import Source, folder_source, npz_source
from data_tools.splits import (
    DEFAULT_FRACTIONS,
    assign_groups,
    group_function,
    parse_fractions,
    shuffled,
    stratified_split,
)
from data_tools.writer import Staging, build_manifest, write_splits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.pack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="image folder tree, image root (CSV/NIH) or .npz file")
    parser.add_argument("out_dir", type=Path, help="output directory (must not exist or be empty)")
    labels = parser.add_argument_group("label files")
    labels.add_argument(
        "--labels-csv", type=Path, help="CSV (or .tsv) label table; image paths relative to SOURCE"
    )
    labels.add_argument("--image-col", help="CSV column with the image path")
    labels.add_argument("--label-cols", type=comma_list, help="one class-name column, or several 0/1 columns")
    labels.add_argument("--split-col", help="optional CSV column with train/val/valid/test")
    labels.add_argument(
        "--nih-list", action="append", metavar="[SPLIT=]FILE", help="NIH ChestX-ray14 list file"
    )
    labels.add_argument("--classes", type=comma_list, help="class names in label order (default: sorted)")
    labels.add_argument(
        "--ordinal",
        action="store_true",
        help="the classes are ordered (e.g. disease grades) in the --classes order, lowest first: task "
        "'ordinal', scored with quadratic-weighted kappa (needs --classes; nominal classes get accuracy, "
        "macro F1 and macro AUC instead)",
    )
    split = parser.add_argument_group("splits")
    split.add_argument("--split-fractions", help=f"train,val,test fractions (default {DEFAULT_FRACTIONS})")
    split.add_argument(
        "--group-by", help="folder depth (int) or regex on the relative path; keeps groups disjoint"
    )
    split.add_argument("--resplit", action="store_true", help="ignore the source's own splits")
    image = parser.add_argument_group("images")
    image.add_argument("--max-side", type=positive_int, help="downscale so the longer side is at most this")
    image.add_argument("--min-side", type=positive_int, help="images with a shorter side are bad")
    image.add_argument("--image-mode", choices=("auto", *IMAGE_MODES), default="auto")
    image.add_argument(
        "--skip-bad", action="store_true", help="skip bad images and record them in the manifest"
    )
    add_common_args(parser)
    return parser


def load_source(args: argparse.Namespace) -> Source:
    csv_options = {
        "--image-col": args.image_col,
        "--label-cols": args.label_cols,
        "--split-col": args.split_col,
    }
    if args.labels_csv and args.nih_list:
        raise PackError("give either --labels-csv or --nih-list, not both")
    if not args.labels_csv and any(csv_options.values()):
        raise PackError(f"{', '.join(k for k, v in csv_options.items() if v)}: only valid with --labels-csv")
    if args.labels_csv:
        if not args.image_col or not args.label_cols:
            raise PackError("--labels-csv needs --image-col and --label-cols")
        return csv_source(
            args.labels_csv, args.source, args.image_col, args.label_cols, args.split_col, args.classes
        )
    if args.nih_list:
        if args.classes:
            raise PackError("--classes cannot be used with --nih-list (the 14 NIH findings are the classes)")
        return nih_source([parse_nih_list(text) for text in args.nih_list], args.source)
    if args.source.suffix.lower() == ".npz":
        return npz_source(args.source, args.classes)
    return folder_source(args.source, args.classes)


def check_ordinal(args: argparse.Namespace, source: Source) -> None:
    """``--ordinal`` needs single-label data, three or more classes, and their order from ``--classes``
    (sorted names such as ``Mild, Moderate, No_DR, ...`` are not an order)."""
    if not args.ordinal:
        return
    if source.multilabel:
        raise PackError(f"{source.path}: --ordinal is for single-label classes; this source is multi-label")
    if not args.classes:
        raise PackError(
            f"{source.path}: --ordinal needs the class order, lowest first, e.g. --classes "
            f"{','.join(source.class_names)} in the right order (found {list(source.class_names)}; "
            "the packer does not guess an order from names)"
        )
    if len(source.class_names) < 3:
        raise PackError(f"--ordinal needs three or more classes; {list(source.class_names)} is a binary task")


class Probe(NamedTuple):
    reason: str | None
    gray: bool


def _probe(record: Record, min_side: int | None, skip_bad: bool) -> Probe:
    try:
        return Probe(None, probe(record.ref, min_side))
    except BadImage as err:
        if not skip_bad:
            raise PackError(
                f"{record.ref.describe()}: {err.reason} (pass --skip-bad to skip bad images)"
            ) from None
        return Probe(err.reason, False)


def check_images(records: list[Record], args: argparse.Namespace) -> tuple[list[Record], list[dict], bool]:
    """Decode every image once: returns the good records, the skipped ones and whether all are grayscale."""
    check = partial(_probe, min_side=args.min_side, skip_bad=args.skip_bad)
    probes = parallel_map(check, records, args.workers, "checking images", quiet=args.quiet)
    good = [record for record, result in zip(records, probes, strict=True) if result.reason is None]
    skipped = [
        {"path": record.source, "reason": result.reason}
        for record, result in zip(records, probes, strict=True)
        if result.reason is not None
    ]
    if not good:
        raise PackError(f"{args.source}: all {len(records)} images are bad (first: {skipped[0]})")
    return good, skipped, all(result.gray for result in probes if result.reason is None)


def make_splits(
    records: list[Record], fractions: dict[str, float] | None, num_classes: int, seed: int
) -> tuple[dict[str, list[Record]], str]:
    """Each split's records in seeded shuffled order, and the manifest's ``split_method``; ``fractions``
    None keeps the source's splits."""
    if fractions is None:
        splits = {name: [r for r in records if r.split == name] for name in SPLITS}
        _warn_shared_groups(splits)
        method = "source"
    else:
        splits = stratified_split(records, fractions, num_classes, seed)
        method = "stratified_group" if records[0].group is not None else "stratified"
    return {name: shuffled(split, seed) for name, split in splits.items() if split}, method


def _warn_shared_groups(splits: dict[str, list[Record]]) -> None:
    seen: dict[str, str] = {}
    shared = set()
    for name, records in splits.items():
        for group in {record.group for record in records if record.group is not None}:
            if seen.setdefault(group, name) != name:
                shared.add(group)
    if shared:
        print(
            f"warning: {len(shared)} group(s) appear in several source splits, e.g. {sorted(shared)[:3]}",
            file=sys.stderr,
        )


def pack(args: argparse.Namespace) -> dict:
    """Run the whole packing; returns the manifest."""
    staging = Staging(args.out_dir, args.overwrite, protect=args.source)
    fractions = parse_fractions(args.split_fractions or DEFAULT_FRACTIONS)
    group_of = group_function(args.group_by) if args.group_by else None
    source = load_source(args)
    if len(source.class_names) < 2:
        raise PackError(
            f"{source.path}: found only the class(es) {list(source.class_names)}; need two or more"
        )
    check_ordinal(args, source)
    if source.has_splits and not args.resplit:
        if args.split_fractions:
            raise PackError(
                f"{source.path}: the source has its own splits; add --resplit to use --split-fractions"
            )
        fractions = None
    records = assign_groups(source.records, group_of)
    records, skipped, all_gray = check_images(records, args)
    splits, method = make_splits(records, fractions, len(source.class_names), args.seed)
    mode = args.image_mode if args.image_mode != "auto" else ("L" if all_gray else "RGB")
    labels = LabelSpace(source.class_names, source.multilabel, args.ordinal)
    encode = EncodeOptions(mode, args.jpeg_quality, args.max_side)
    with staging:
        entries = write_splits(staging.tmp, splits, labels, encode, args.shard_size, args.workers, args.quiet)
        manifest = build_manifest(
            labels=labels,
            image_mode=mode,
            split_method=method,
            splits=entries,
            skipped=skipped,
            source=source.manifest_entry(),
            args=vars(args),
        )
        staging.commit(manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run(pack, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
