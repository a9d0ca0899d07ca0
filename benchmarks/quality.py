"""Recipe search: which pretraining recipe gives features that beat their pixels, per minute of CPU.

Each row pretrains with the real entry point (`launch/pretrain.py`, one process), then runs the
real linear probe (`launch/finetune.py`, which also fits the raw-pixel baseline on the same split)
and, with --finetune, the real fine-tune (with its from-scratch baseline). A row records what was
tried (objective, tokens per image, model shape, steps, lr, pooling) and what it gave (probe and
fine-tune top-1 beside their baselines, images seen, minutes). Rows are appended to
`<out>/rows.jsonl` as they finish, so an interrupted search continues where it stopped.

    python benchmarks/quality.py --dataset fmnist-demo --recipes demo init --finetune   # a few rows
    python benchmarks/quality.py --dataset digits --recipes patch2 --finetune           # second dataset
    python benchmarks/quality.py --dataset fmnist-full --recipes full2 --finetune       # all of it, ~1 h
    python benchmarks/quality.py --list                                               # every recipe

Datasets: `fmnist-demo` is `make demo`'s split (first 20,000 train / 2,000 test Fashion-MNIST
images at 28x28); `fmnist-demo14` is the same split downscaled to 14x14 (the first demo's);
`fmnist-full` is all of it at 28x28 (60k/10k); `digits` is scikit-learn's 8x8 digits upscaled to
16x16, the first 1,437 images for training and the last 360 for test (use a 2x2-patch recipe:
4x4 patches leave a 4x4 token grid, too small for the demo's 7x7 probe grid).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Recipe:
    """One pretraining recipe and how its features are read."""

    name: str
    pretrain: tuple[str, ...]  # overrides on configs/pretrain/fmnist_demo.yaml
    probe: tuple[str, ...] = ()  # overrides on configs/finetune/linear_probe.yaml
    finetune: tuple[str, ...] = ()  # overrides on configs/finetune/finetune.yaml
    note: str = ""


def _demo_recipe() -> Recipe:
    """`make demo`'s own overrides (launch/demo.py FULL), so the table measures exactly the demo's recipe."""
    sys.path.insert(0, str(ROOT / "launch"))
    from demo import FULL

    return Recipe("demo", tuple(FULL.pretrain), tuple(FULL.probe), tuple(FULL.finetune),
                  note="make demo: next_patch on 4x4 patches, two blocks, 3600 steps; probe block 0's 7x7 grid; LP-FT of block 0")


DEMO = _demo_recipe()
NEXT_PIXEL = ("model.objective=next_pixel",)
# igpt-tiny's four blocks: the shape every row before Quality 9 was measured with (the demo now has two)
BLOCKS4 = ("model.n_layer=4",)
GRID4 = ("task.pooling=grid", "task.grid_size=4")
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    DEMO,
    Recipe("init", ("train.steps=1", "optim.lr=1.0e-12", "schedule.warmup_steps=1"), DEMO.probe, DEMO.finetune,
           note="control: the demo's backbone at its random initialisation (one step at lr 1e-12)"),
    Recipe("patch2-grid4", ("train.steps=1500", "model.patch_size=2", *BLOCKS4), GRID4, note="next_patch 2x2, every layer's 4x4 grid (fmnist-demo14)"),
    Recipe("pixel-mean", ("train.steps=1000", *NEXT_PIXEL, *BLOCKS4), ("task.pooling=mean",),
           note="the first demo's recipe: next pixel, igpt-tiny, mean pooling (fmnist-demo14: 196 tokens)"),
    Recipe("pixel-grid4", ("train.steps=1000", *NEXT_PIXEL, *BLOCKS4), GRID4, note="(fmnist-demo14)"),
    Recipe("masked-grid4", ("train.steps=1000", "model.objective=masked_pixel", *BLOCKS4), GRID4, note="(fmnist-demo14)"),
    Recipe("blocks4", (*DEMO.pretrain, *BLOCKS4), DEMO.probe, DEMO.finetune,
           note="the demo's recipe with igpt-tiny's four blocks instead of two"),
    Recipe("full", (*DEMO.pretrain, *BLOCKS4, "train.steps=9000"), DEMO.probe,
           (*DEMO.finetune, "train.steps=3000", "schedule.warmup_steps=300"),
           note="for the full dataset (Quality 8): four blocks, 9000 steps (4.8 epochs of 60,000), a 3000-step fine-tune"),
    Recipe("full2", (*DEMO.pretrain, "train.steps=18000"), DEMO.probe,
           (*DEMO.finetune, "train.steps=6000", "schedule.warmup_steps=600", "optim.lr=1.0e-3"),
           note="for the full dataset (Quality 10): the demo's two blocks, 18000 steps (9.6 epochs of 60,000); "
                "a 6000-step fine-tune at lr 1e-3"),
    Recipe("patch2", (*DEMO.pretrain, "model.patch_size=2"), DEMO.probe, DEMO.finetune,
           note="the demo's recipe on 2x2 patches: 49 positions of a 14x14 image (fmnist-demo14), 64 of digits"),
    Recipe("patch2-mini-grid4", ("train.steps=1500", "model.patch_size=2", "model.preset=igpt-mini", "model.n_layer=8"), GRID4,
           note="(fmnist-demo14)"),
]}


DATASET_SIZES = {"fmnist-demo": 28, "fmnist-demo14": 14, "fmnist-full": 28, "digits": 16}


@dataclass
class Dataset:
    name: str
    manifest: Path
    image_size: int


def build_dataset(name: str, data_root: Path) -> Dataset:
    """Write the dataset's shards once (reused when the manifest exists)."""
    out = data_root / name
    manifest = out / "manifest.json"
    data_root.mkdir(parents=True, exist_ok=True)
    size = DATASET_SIZES[name]
    if not manifest.is_file():
        if name == "digits":
            source = _digits_npz(data_root / "digits.npz")
            argv = ["--source", "npz", "--input", str(source)]
        elif name.startswith("fmnist-demo"):
            sys.path.insert(0, str(ROOT / "launch"))
            from demo import write_idx_subset

            subset = data_root / "fmnist-demo-idx"
            write_idx_subset(FASHION_MNIST, subset, {"train": 20000, "test": 2000})
            argv = ["--source", "idx", "--input", str(subset)]
        else:
            argv = ["--source", "idx", "--input", str(FASHION_MNIST)]
        _run([sys.executable, "-m", "data_shards", "make", *argv, "--out", str(out), "--name", name,
              "--resize", str(size), "--shard-size", "5000", "--force"])
    return Dataset(name, manifest, size)


def _digits_npz(path: Path) -> Path:
    """scikit-learn's digits (8x8, values 0..16) as 8-bit images, split 1437 / 360 in file order."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    np.savez(path, x_train=images[:1437], y_train=labels[:1437], x_test=images[1437:], y_test=labels[1437:])
    return path


def _run(argv: list[str], log: Path | None = None) -> float:
    """Run a command (its output into `log`), return its wall time; a failure stops the search."""
    started = time.monotonic()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        code = subprocess.call(argv, cwd=ROOT, stdout=sink if log else None, stderr=subprocess.STDOUT if log else None)
    if code != 0:
        raise SystemExit(f"quality: `{' '.join(argv)}` failed with exit code {code}" + (f"; see {log}" if log else ""))
    return time.monotonic() - started


def run_recipe(recipe: Recipe, data: Dataset, out: Path, finetune: bool, extra: list[str]) -> dict:
    """Pretrain, probe (and fine-tune); returns the table row."""
    work = out / data.name / recipe.name
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    common = [f"data.manifest={data.manifest}", "data.num_workers=0"]
    pretrain = [sys.executable, "launch/pretrain.py", "--config", "configs/pretrain/fmnist_demo.yaml",
                f"run_dir={run_dir}", "parallel.strategy=single", "train.micro_batch_size=32",
                "train.global_batch_size=32", "train.sample_every=0", "checkpoint.resume=auto", *common,
                *recipe.pretrain, *extra]
    seconds = {"pretrain": _run(pretrain, work / "pretrain.log")}
    probe_dir = work / "probe"
    seconds["probe"] = _run([sys.executable, "launch/finetune.py", "--config", "configs/finetune/linear_probe.yaml",
                             f"init={run_dir}", f"output_dir={probe_dir}", "overwrite=true", *common, *recipe.probe],
                            work / "probe.log")
    probe = json.loads((probe_dir / "results.json").read_text())
    config = json.loads(json.dumps(_read_yaml(run_dir / "config.yaml")))
    model = config["model"]
    row = {
        "dataset": data.name, "recipe": recipe.name, "objective": model["objective"],
        "tokens_per_image": _tokens(model), "layers": model["n_layer"], "width": model["n_embd"],
        "steps": config["train"]["steps"], "lr": config["optim"]["lr"],
        "images_seen": config["train"]["steps"] * config["train"]["micro_batch_size"] * config["train"]["grad_accum"],
        "pooling": _pooling(recipe.probe), "probe_top1": probe["top1"],
        "pixels_top1": probe["baselines"]["pixels"]["top1"], "probe_layer": probe.get("chosen_layer"),
    }
    if finetune:
        finetune_dir = work / "finetune"
        seconds["finetune"] = _run([sys.executable, "launch/finetune.py", "--config", "configs/finetune/finetune.yaml",
                                    f"init={run_dir}", f"output_dir={finetune_dir}", "overwrite=true", *common,
                                    *recipe.finetune], work / "finetune.log")
        result = json.loads((finetune_dir / "results.json").read_text())
        row["finetune_top1"] = result["top1"]
        row["scratch_top1"] = result["baselines"].get("scratch", {}).get("top1")
    row["minutes"] = {k: round(v / 60, 2) for k, v in seconds.items()}
    row["load_average"] = round(os.getloadavg()[0], 1)
    return row


def _pooling(overrides: tuple[str, ...]) -> str:
    keys = dict(item.split("=", 1) for item in overrides)
    kind = keys.get("task.pooling", "mean")
    return f"grid{keys.get('task.grid_size', '')}" if kind == "grid" else kind


def _tokens(model: dict) -> int:
    side = model["image_size"] // (model["patch_size"] if model["objective"] == "next_patch" else 1)
    return side * side


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def table(rows: list[dict]) -> list[str]:
    """Markdown rows, model beside its pixel baseline."""
    lines = ["| dataset | recipe | objective | tokens | layers×width | steps | lr | pooling | probe | pixels | "
             "fine-tune | scratch | images seen | pretrain min | probe min | fine-tune min | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
        minutes = lambda row, stage: "—" if stage not in row["minutes"] else f"{row['minutes'][stage]:.1f}"  # noqa: E731
        lines.append(
            f"| {r['dataset']} | {r['recipe']} | {r['objective']} | {r['tokens_per_image']} | {r['layers']}×{r['width']} | "
            f"{r['steps']} | {r['lr']:g} | {r['pooling']} | {pct(r['probe_top1'])} | {pct(r['pixels_top1'])} | "
            f"{pct(r.get('finetune_top1'))} | {pct(r.get('scratch_top1'))} | {r['images_seen']:,} | "
            f"{r['minutes']['pretrain']:.1f} | {r['minutes']['probe']:.1f} | "
            f"{minutes(r, 'finetune')} | {r['load_average']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fmnist-demo", choices=sorted(DATASET_SIZES))
    parser.add_argument("--recipes", nargs="+", default=["demo", "init"])
    parser.add_argument("--finetune", action="store_true", help="also fine-tune (with its from-scratch baseline)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "quality")
    parser.add_argument("--data-root", type=Path, default=ROOT / "bench_out" / "quality_data")
    parser.add_argument("--override", nargs="*", default=[], help="extra pretraining overrides for every row")
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = parser.parse_args(argv)
    if args.list:
        for recipe in RECIPES.values():
            print(f"{recipe.name:<14} {' '.join(recipe.pretrain + recipe.probe)}  {recipe.note}")
        return 0
    unknown = [name for name in args.recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; see --list")
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_root.mkdir(parents=True, exist_ok=True)
    data = build_dataset(args.dataset, args.data_root)
    rows_file = args.out / "rows.jsonl"
    done = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    for name in args.recipes:
        if any(r["dataset"] == data.name and r["recipe"] == name for r in done):
            continue
        row = run_recipe(RECIPES[name], data, args.out, args.finetune, args.override)
        with open(rows_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        done.append(row)
        print("\n".join(table([row])[2:]), flush=True)
    print("\n".join(table([r for r in done if r["dataset"] == data.name])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
