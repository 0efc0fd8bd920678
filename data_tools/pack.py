"""Pack an image dataset into WebDataset shards + DALI indices + ``manifest.json``.

Usage::

    python -m data_tools.pack SOURCE OUT_DIR [options]

SOURCE is one of

- an image-folder tree ``[split/][group folders/]class/image`` (class = parent folder name; top-level
  ``train``/``val``/``valid``/``test`` folders are kept as the splits);
- an image root with ``--labels-csv FILE --image-col COL --label-cols A[,B,...] [--split-col COL]``
  (one column of class names = single-label, several 0/1 columns = multi-label);
  with ``--label-sep SEP`` one column of SEP-joined class names is multi-label (``--empty-label`` names
  the value meaning none), ``--group-col COL`` gives groups (e.g. patients) for group-disjoint splits;
- an image root with ``--nih-csv Data_Entry_2017.csv``: NIH ChestX-ray14's label file as distributed
  (the 14 findings in NIH order, ``No Finding`` = none, groups from ``Patient ID``);
- an image root with ``--nih-list [SPLIT=]FILE`` (repeatable): NIH ChestX-ray14 ``name l1 .. l14`` lists;
- a MedMNIST-style ``.npz`` file (``train_images``/``train_labels``, ``val_*``, ``test_*``).

Sources without splits (or with ``--resplit``) get seeded, stratified train/val/test splits
(``--split-fractions``, ``--seed``), group-disjoint with ``--group-by`` or ``--group-col`` (see
`data_tools.splits`).  ``--split-list SPLIT=FILE`` takes the splits from lists of image names instead
(NIH's ``train_val_list.txt`` / ``test_list.txt``); a ``trainval`` list is divided into train and val.
Single-label classes are nominal (task ``multiclass``) unless ``--ordinal --classes A,B,C`` gives their
order (task ``ordinal``, e.g. retinopathy grades).
Colour handling is described in `data_tools.imaging`.  Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

from data_tools import dicom
from data_tools.command import add_common_args, comma_list, positive_int, run
from data_tools.errors import BadImage, PackError
from data_tools.imaging import IMAGE_MODES, probe
from data_tools.labelfiles import CsvLayout, csv_source, nih_csv_source, nih_source, parse_nih_list
from data_tools.parallel import parallel_map
from data_tools.records import Record
from data_tools.shard_writer import EncodeOptions
from data_tools.sources import Source, folder_source, map_classes, npz_source, parse_label_map
from data_tools.splits import (
    DEFAULT_FRACTIONS,
    TRAINVAL_FRACTIONS,
    apply_split_lists,
    assign_groups,
    choose_fractions,
    group_function,
    make_splits,
    parse_fractions,
    parse_split_list,
)
from data_tools.writer import Staging, build_manifest, write_splits
from ilm_dist.data.shard_format import LabelSpace
from ilm_dist.errors import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
        "--group-col", help="CSV column with a group id (e.g. 'Patient ID'): group-disjoint splits"
    )
    labels.add_argument(
        "--label-sep",
        metavar="SEP",
        help="the one --label-cols column holds class names joined by SEP (e.g. '|'): multi-label",
    )
    labels.add_argument(
        "--empty-label",
        metavar="VALUE",
        help="with --label-sep: the value meaning no class (e.g. 'No Finding')",
    )
    labels.add_argument(
        "--nih-csv",
        type=Path,
        metavar="FILE",
        help="NIH ChestX-ray14's Data_Entry_2017.csv as distributed: the 14 findings in NIH order from "
        "'Finding Labels' ('|'-joined, 'No Finding' = none), groups from 'Patient ID'",
    )
    labels.add_argument(
        "--nih-list", action="append", metavar="[SPLIT=]FILE", help="NIH ChestX-ray14 list file"
    )
    labels.add_argument("--classes", type=comma_list, help="class names in label order (default: sorted)")
    labels.add_argument(
        "--map-labels",
        type=parse_label_map,
        metavar="OLD=NEW,...",
        help="relabel single-label classes (every source class needs an entry; --classes then orders the "
        "new ones), e.g. referable DR: 0=no,1=no,2=yes,3=yes,4=yes --classes no,yes",
    )
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
    split.add_argument(
        "--split-list",
        action="append",
        type=parse_split_list,
        metavar="SPLIT=FILE",
        help="repeatable: FILE lists the image names (first field per line) of SPLIT (train, val, test, or "
        "trainval: divided into train and val by --split-fractions with test 0, default "
        f"{TRAINVAL_FRACTIONS}), e.g. NIH's trainval=train_val_list.txt test=test_list.txt",
    )
    image = parser.add_argument_group("images")
    image.add_argument("--max-side", type=positive_int, help="downscale so the longer side is at most this")
    image.add_argument("--min-side", type=positive_int, help="images with a shorter side are bad")
    image.add_argument("--image-mode", choices=("auto", *IMAGE_MODES), default="auto")
    image.add_argument(
        "--fundus-crop",
        type=positive_int,
        metavar="SIZE",
        help="fundus photographs: crop to the fundus disc, centred, resized to SIZE x SIZE (the JAMA 2016 "
        "replication's preprocessing at 299); images without a disc are bad images",
    )
    image.add_argument(
        "--skip-bad", action="store_true", help="skip bad images and record them in the manifest"
    )
    image.add_argument(
        "--allow-empty-folders",
        action="store_true",
        help="folder trees: pack even if some folders hold no images (their classes are left out)",
    )
    add_common_args(parser)
    return parser


def load_source(args: argparse.Namespace, classes: list[str] | None) -> Source:
    """The source named by the arguments; ``classes``: the class order (``--classes``, unless labels are
    mapped afterwards)."""
    csv_options = {
        "--image-col": args.image_col,
        "--label-cols": args.label_cols,
        "--split-col": args.split_col,
        "--group-col": args.group_col,
        "--label-sep": args.label_sep,
        "--empty-label": args.empty_label,
    }
    given = [
        name
        for name, value in (
            ("--labels-csv", args.labels_csv),
            ("--nih-csv", args.nih_csv),
            ("--nih-list", args.nih_list),
        )
        if value
    ]
    if len(given) > 1:
        raise PackError(f"give one of --labels-csv, --nih-csv, --nih-list, not {' and '.join(given)}")
    if not args.labels_csv and any(csv_options.values()):
        raise PackError(f"{', '.join(k for k, v in csv_options.items() if v)}: only valid with --labels-csv")
    if args.group_col and args.group_by:
        raise PackError("give either --group-col or --group-by, not both")
    if args.labels_csv:
        if not args.image_col or not args.label_cols:
            raise PackError("--labels-csv needs --image-col and --label-cols")
        layout = CsvLayout(
            args.image_col,
            tuple(args.label_cols),
            args.split_col,
            args.group_col,
            args.label_sep,
            args.empty_label,
        )
        return csv_source(args.labels_csv, args.source, layout, classes)
    if args.nih_csv or args.nih_list:
        if args.classes:
            raise PackError("--classes cannot be used with NIH files (the 14 NIH findings are the classes)")
        if args.nih_csv:
            return nih_csv_source(args.nih_csv, args.source)
        return nih_source([parse_nih_list(text) for text in args.nih_list], args.source)
    if args.source.suffix.lower() == ".npz":
        return npz_source(args.source, classes)
    return folder_source(args.source, classes, args.allow_empty_folders)


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
    dicom: dict | None = None  # the DICOM attributes used, for DICOM files


class Checked(NamedTuple):
    good: list[Record]
    skipped: list[dict]
    all_gray: bool
    dicom: list[dict]  # per good DICOM image, the attributes its conversion used


def _probe(record: Record, min_side: int | None, skip_bad: bool, fundus: int | None) -> Probe:
    try:
        return Probe(None, *probe(record.ref, min_side, fundus))
    except BadImage as err:
        if not skip_bad:
            raise PackError(
                f"{record.ref.describe()}: {err.reason} (pass --skip-bad to skip bad images)"
            ) from None
        return Probe(err.reason, False)


def check_images(records: list[Record], args: argparse.Namespace) -> Checked:
    """Decode every image once: the good records, the skipped ones, whether all are grayscale, and the
    DICOM attributes used."""
    check = partial(_probe, min_side=args.min_side, skip_bad=args.skip_bad, fundus=args.fundus_crop)
    probes = parallel_map(check, records, args.workers, "checking images", quiet=args.quiet)
    good = [record for record, result in zip(records, probes, strict=True) if result.reason is None]
    skipped = [
        {"path": record.source, "reason": result.reason}
        for record, result in zip(records, probes, strict=True)
        if result.reason is not None
    ]
    if not good:
        raise PackError(f"{args.source}: all {len(records)} images are bad (first: {skipped[0]})")
    fine = [result for result in probes if result.reason is None]
    return Checked(good, skipped, all(r.gray for r in fine), [r.dicom for r in fine if r.dicom is not None])


def pack(args: argparse.Namespace) -> dict:
    """Run the whole packing; returns the manifest."""
    with Staging(args.out_dir, args.overwrite, protect=args.source) as staging:
        return _pack_into(staging, args)


def _pack_into(staging: Staging, args: argparse.Namespace) -> dict:
    if args.split_fractions:
        parse_fractions(args.split_fractions)  # a typo is reported before the source is read
    group_of = group_function(args.group_by) if args.group_by else None
    source = load_source(args, None if args.map_labels else args.classes)
    if args.map_labels:
        source = map_classes(source, args.map_labels, args.classes)
    if len(source.class_names) < 2:
        raise PackError(
            f"{source.path}: found only the class(es) {list(source.class_names)}; need two or more"
        )
    check_ordinal(args, source)
    records = apply_split_lists(source.records, args.split_list) if args.split_list else source.records
    fractions = choose_fractions(args, records, source)
    records = assign_groups(records, group_of)
    checked = check_images(records, args)
    splits, method = make_splits(checked.good, fractions, len(source.class_names), args.seed)
    mode = args.image_mode if args.image_mode != "auto" else ("L" if checked.all_gray else "RGB")
    labels = LabelSpace(source.class_names, source.multilabel, args.ordinal)
    encode = EncodeOptions(mode, args.jpeg_quality, args.max_side, args.fundus_crop)
    entries = write_splits(staging.tmp, splits, labels, encode, args.shard_size, args.workers, args.quiet)
    manifest = build_manifest(
        labels=labels,
        image_mode=mode,
        split_method=method,
        splits=entries,
        skipped=checked.skipped,
        source=source.manifest_entry(),
        args=vars(args),
        extra={"dicom": dicom.summarise(checked.dicom)} if checked.dicom else None,
    )
    staging.commit(manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run(pack, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
