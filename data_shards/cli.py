"""`data-shards make|verify`: argument parsing and wiring; the work lives in sources/writer/verify."""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gpt_vision.errors import UserError

from .sources import SourceData, load_source
from .splits import Split, Subset, carve_validation
from .verify import verify_dir
from .writer import DEFAULT_SHARD_SIZE, write_dataset

PROG = "data-shards"
MAX_PRINTED_PROBLEMS = 100


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the same single `data-shards: error: ...` line as any other."""

    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description="Write and check WebDataset image shards for gpt_vision.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    make = commands.add_parser("make", help="convert a dataset into tar shards + manifest.json")
    make.add_argument("--source", required=True, choices=["idx", "cifar", "folder", "npz"])
    make.add_argument("--input", required=True, action="append",
                      help="source directory; for npz one or more files or split=file pairs (repeat --input)")
    make.add_argument("--out", required=True, type=Path, help="output directory for shards and manifest.json")
    make.add_argument("--name", required=True, help="dataset name recorded in the manifest")
    which = make.add_mutually_exclusive_group()
    which.add_argument("--split", help="comma-separated splits of the input to write, e.g. train,test")
    which.add_argument("--val-fraction", type=float, help="carve a seeded 'val' split of this fraction from train")
    make.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    make.add_argument("--resize", type=int, help="resize to SxS (centered square crop first, Lanczos)")
    make.add_argument("--mode", choices=["L", "RGB"], help="image mode (default: the first image's)")
    make.add_argument("--class-names", help="comma-separated class names replacing the source's")
    make.add_argument("--force", action="store_true", help="replace earlier shards/manifest in --out")
    make.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail above this unreadable share")
    make.add_argument("--seed", type=int, default=0, help="seed for --val-fraction and folder shuffling")

    verify = commands.add_parser("verify", help="re-read shards and check them against manifest.json")
    verify.add_argument("dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _make(args) if args.command == "make" else _verify(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; no shards or manifest were published", file=sys.stderr)
        return 130


def _make(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    source = load_source(args.source, args.input)
    classes = _class_names(source, args.class_names)
    splits = source.splits
    if args.split is not None:
        splits = _select_splits(splits, args.split)
    if args.val_fraction is not None:
        splits = carve_validation(splits, args.val_fraction, args.seed)
    if args.source == "folder":
        # Folder listings are class-sorted; a seeded shuffle makes every shard mix classes.
        rng = np.random.default_rng(args.seed)
        splits = {name: Subset(split, rng.permutation(len(split))) for name, split in splits.items()}
    manifest = write_dataset(
        splits, args.out, args.name, classes=classes, mode=args.mode, resize=args.resize,
        shard_size=args.shard_size, force=args.force, max_bad_fraction=args.max_bad_fraction,
    )
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['num_samples']} samples in {len(entry['shards'])} shards")
    height, width = manifest["image_size"]
    print(f"images: {manifest['mode']} {height}x{width}; classes: {len(classes) if classes else 'none (unlabeled)'}")
    if manifest["bad_samples"]["count"]:
        print(f"skipped {manifest['bad_samples']['count']} bad images (listed in the manifest)")
    print(f"wrote {args.out / 'manifest.json'} in {time.perf_counter() - start:.1f}s")
    return 0


def _class_names(source: SourceData, spec: str | None) -> list[str] | None:
    if spec is None:
        return source.classes
    names = [n.strip() for n in spec.split(",")]
    if source.classes is None:
        raise UserError("--class-names given but the input has no labels")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise UserError(f"--class-names {spec!r} has empty or repeated names")
    if len(names) < len(source.classes):
        raise UserError(f"--class-names gives {len(names)} names but the input has {len(source.classes)} classes")
    return names


def _select_splits(splits: dict[str, Split], spec: str) -> dict[str, Split]:
    names = [n.strip() for n in spec.split(",")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise UserError(f"bad split spec {spec!r}: empty or repeated split name")
    unknown = [n for n in names if n not in splits]
    if unknown:
        raise UserError(f"bad split spec {spec!r}: input has no split {unknown[0]!r} (has: {', '.join(splits)})")
    return {n: splits[n] for n in names}


def _verify(args: argparse.Namespace) -> int:
    if not args.dir.exists():
        raise UserError(f"{args.dir} does not exist")
    report = verify_dir(args.dir)
    for problem in report.problems[:MAX_PRINTED_PROBLEMS]:
        print(f"{PROG}: problem: {problem}", file=sys.stderr)
    if len(report.problems) > MAX_PRINTED_PROBLEMS:
        print(f"{PROG}: problem: ... and {len(report.problems) - MAX_PRINTED_PROBLEMS} more", file=sys.stderr)
    counts = ", ".join(f"{split} {n}" for split, n in report.samples.items())
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {args.dir}: {status}; read {report.shards} shards, samples: {counts or 'none'}")
    return 0 if report.ok else 1
