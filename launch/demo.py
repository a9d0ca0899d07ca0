"""`make demo`: the whole system on real Fashion-MNIST, on CPU, in about 20 minutes.

Every step runs as a subprocess and is printed first as the plain command, so it can be rerun by
hand: shards -> two-process FSDP pretraining (stopped with SIGUSR1 after a checkpoint, then resumed
by rerunning the same command) -> linear probe, fine-tune, distillation -> sample grids (next_pixel
recipes only) -> summary. The 28x28 images are pretrained as 49 patches of 4x4, and the demo uses the
first 20,000 training and 2,000 test images, because pretraining on 2 CPU cores runs at a few
thousand tokens/s. `--small` (or DEMO_SCALE=small) runs the same pipeline with a
next_pixel model on a few hundred 8x8 images in a few minutes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt_vision.errors import EXIT_PREEMPTED  # noqa: E402
from gpt_vision.layout import atomic_file  # noqa: E402

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


@dataclass
class Scale:
    """How big the demo is; `small` is what the end-to-end test runs."""

    name: str
    train_images: int
    test_images: int
    image_size: int
    pretrain: list[str]  # overrides on top of configs/pretrain/fmnist_demo.yaml
    stop_after_step: int  # SIGUSR1 once this step's checkpoint is complete
    probe: list[str]
    finetune: list[str]
    distill: list[str]
    sample: list[str] | None  # launch/sample.py arguments; None: the recipe cannot sample (not next_pixel)
    notes: list[str] = field(default_factory=list)


# The recipe the Quality table of benchmarks/RESULTS.md chose: next_patch pretraining on 4x4 patches
# of the full 28x28 images (the config), a probe on the first block's unpooled 7x7 token grid, and a
# fine-tune of that block whose head starts as that converged probe (LP-FT), for ~3 epochs without
# augmentation (crop and flip each cost 0.3-1.5 points there) but with head dropout and label
# smoothing; the student (2 blocks x 48: under a quarter of the two-block teacher's parameters, the
# distiller's default limit) reads its own 7x7 token grid the same way, its heads fitted as the probe
# on its initial features first. The L2 sweep keeps the two values every measured run chose between.
# The pixel baseline is fitted once, by the probe: the fine-tune and the student read the same split
# and are printed beside their own baselines (from scratch, labels only).
FULL = Scale(
    name="full", train_images=20000, test_images=2000, image_size=28,
    pretrain=[], stop_after_step=200,
    probe=["task.pooling=grid", "task.grid_size=7", "task.layers=[0]", "task.probe_l2=[1.0e-2,1.0e-1]",
           "task.probe_max_iter=150"],
    finetune=["train.steps=1000", "schedule.warmup_steps=100", "task.pooling=grid", "task.grid_size=7",
              "task.layers=[0]", "task.head_init=probe", "task.head_dropout=0.1", "task.label_smoothing=0.1",
              "task.generative_weight=0", "optim.lr=2.0e-4", "data.augment.random_crop_padding=0",
              "data.augment.flip=false", "task.probe_l2=[1.0e-2,1.0e-1]", "task.probe_max_iter=150",
              "task.baselines=[scratch]"],
    distill=["train.steps=400", "train.batch_size=64", "schedule.warmup_steps=40", "student.preset=vit-tiny",
             "student.patch_size=4", "student.n_layer=2", "student.n_embd=48", "student.pooling=grid",
             "student.grid_size=7", "student.head_init=probe", "optim.lr=1.0e-3", "task.probe_l2=[1.0e-3,1.0e-2]", "task.probe_max_iter=150",
             "task.baselines=[]"],
    sample=None,
)
SMALL = Scale(
    name="small", train_images=512, test_images=128, image_size=8,
    # next_pixel, unlike the full recipe, so that the end-to-end test also samples from a demo run
    pretrain=["model.objective=next_pixel", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "tokenizer.clusters=8",
              "tokenizer.sample_pixels=20000", "schedule.warmup_steps=4", "train.probe_every=24",
              "online_probe.train_images=256", "online_probe.test_images=128",
              "train.steps=48", "train.micro_batch_size=8", "train.global_batch_size=16", "train.log_every=4", "train.eval_every=12",
              "train.eval_batches=2", "train.sample_every=12", "train.peak_flops=1e12", "checkpoint.every=8",
              "data.shuffle_buffer=64"],
    stop_after_step=8,
    probe=["train.steps=40", "schedule.warmup_steps=4"],
    finetune=["train.steps=4", "train.batch_size=16", "schedule.warmup_steps=1"],
    distill=["train.steps=6", "train.batch_size=16", "schedule.warmup_steps=2", "student.n_layer=1",
             "student.n_embd=16"],
    sample=["--completions", "4", "--per-image", "2", "--samples", "8"],
)


class DemoError(Exception):
    """A step failed; the message says which and how to continue."""


class Demo:
    def __init__(self, scale: Scale, out: Path, nproc: int):
        self.scale = scale
        self.out = out
        self.nproc = nproc
        self.timings: dict[str, float] = {}
        self.subset = out / "fashion-mnist-subset"
        self.shards = out / "shards"
        self.run_dir = out / "run"
        self.samples = out / "samples"
        self.python = _display_path(Path(sys.executable))

    # ---- printing and running ------------------------------------------------------------

    def header(self, number: int, title: str) -> None:
        print(f"\n=== {number}. {title} ===", flush=True)

    def show(self, argv: list[str]) -> None:
        print("$ " + shlex.join(_display_path(a) if isinstance(a, Path) else _display(a) for a in argv), flush=True)

    def run(self, argv: list, check: bool = True) -> int:
        argv = [str(a) for a in argv]
        self.show(argv)
        code = subprocess.call(argv, cwd=ROOT, env=self._env())
        if check and code != 0:
            raise DemoError(f"the command above failed with exit code {code}; fix it and rerun `make demo` "
                            "(finished steps are reused)")
        return code

    def _env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def timed(self, name: str, body) -> None:
        started = time.monotonic()
        body()
        self.timings[name] = time.monotonic() - started

    # ---- steps -----------------------------------------------------------------------------

    def ensure_dataset(self) -> None:
        self.header(2, f"Fashion-MNIST IDX files in {FASHION_MNIST_DIR}")
        if all((FASHION_MNIST_DIR / name.format(kind, dims)).is_file()
               for name in IDX_FILES.values() for kind, dims in (("images", 3), ("labels", 1))):
            print(f"found (Debian package {FASHION_MNIST_PACKAGE})", flush=True)
            return
        apt = shutil.which("apt-get")
        if apt is None:
            raise DemoError(
                f"{FASHION_MNIST_DIR} is missing and apt-get is not available to install {FASHION_MNIST_PACKAGE}. "
                "Get the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) any other way and point "
                "`python -m data_shards make --source idx --input DIR` at them, or rerun with --idx-dir DIR"
            )
        prefix = [] if os.geteuid() == 0 else ["sudo"]
        self.run(prefix + [apt, "update"])  # a fresh machine's package lists may be empty or stale
        self.run(prefix + [apt, "install", "-y", FASHION_MNIST_PACKAGE])

    def write_shards(self, idx_dir: Path) -> None:
        scale = self.scale
        self.header(3, f"shards: {scale.train_images} train / {scale.test_images} test images at "
                       f"{scale.image_size}x{scale.image_size}")
        manifest = self.shards / "manifest.json"
        if manifest.is_file() and _manifest_matches(manifest, scale):
            print(f"reusing {_display_path(manifest)}", flush=True)
        else:
            print(f"# the first {scale.train_images} train and {scale.test_images} test images of {idx_dir}, "
                  f"copied as IDX files into {_display_path(self.subset)}", flush=True)
            write_idx_subset(idx_dir, self.subset, {"train": scale.train_images, "test": scale.test_images})
            self.run([self.python, "-m", "data_shards", "make", "--source", "idx", "--input", self.subset,
                      "--out", self.shards, "--name", "fashion_mnist", "--resize", str(scale.image_size),
                      "--shard-size", str(max(scale.train_images // 4, 64)), "--force"])
        self.run([self.python, "-m", "data_shards", "verify", self.shards])
        print("# the palette (k-means over gray levels) is fitted by the first pretraining run and saved next to "
              "the shards", flush=True)

    def pretrain_argv(self) -> list:
        return [self.python, ROOT / "launch" / "pretrain.py", "--nproc_per_node", str(self.nproc),
                "--config", ROOT / "configs" / "pretrain" / "fmnist_demo.yaml",
                f"run_dir={_display_path(self.run_dir)}", f"data.manifest={_display_path(self.shards / 'manifest.json')}",
                *self.scale.pretrain]

    def pretrain(self) -> None:
        from gpt_vision import checkpoint as ckpt

        self.header(4, f"pretraining with {self.nproc} processes (FSDP on gloo), interrupted once and resumed")
        steps = _pretrain_config(self.scale).train.steps
        changed = _recipe_changes(self.run_dir / "config.yaml", self.scale)
        if changed:
            raise DemoError(f"{_display_path(self.run_dir)} was pretrained with another recipe ({', '.join(changed)}); "
                            "move or delete it to pretrain the demo's current recipe")
        latest = ckpt.latest_complete(self.run_dir / "checkpoints")
        if latest is not None and _step_of(latest) >= steps:
            print(f"reusing the finished run {_display_path(self.run_dir)} ({latest.name}); delete it to retrain",
                  flush=True)
            return
        if latest is None:
            self.run_until_checkpoint(self.pretrain_argv(), self.scale.stop_after_step)
            print("# the same command again continues from the newest complete checkpoint (checkpoint.resume=auto)",
                  flush=True)
        self.run(self.pretrain_argv())

    def run_until_checkpoint(self, argv: list, step: int) -> None:
        """Run the training command and stop its ranks with SIGUSR1 once step `step` is saved: the
        loop saves where it is and exits 85 (the code Slurm scripts requeue on)."""
        from gpt_vision import checkpoint as ckpt

        argv = [str(a) for a in argv]
        self.show(argv)
        process = subprocess.Popen(argv, cwd=ROOT, env=self._env())
        signalled = False
        while process.poll() is None:
            latest = ckpt.latest_complete(self.run_dir / "checkpoints")
            if not signalled and latest is not None and _step_of(latest) >= step:
                ranks = _children(process.pid)
                print(f"\n$ kill -USR1 {' '.join(map(str, ranks))}    # the {len(ranks)} ranks, after {latest.name}",
                      flush=True)
                for pid in ranks:
                    os.kill(pid, signal.SIGUSR1)
                signalled = True
            time.sleep(0.1)
        if not signalled:
            if process.returncode != 0:
                raise DemoError(f"the command above failed with exit code {process.returncode}; fix it and rerun "
                                "`make demo`")
            print(f"# the run finished before the demo could interrupt it after step {step}", flush=True)
            return
        if process.returncode != EXIT_PREEMPTED:
            raise DemoError(f"the interrupted run exited {process.returncode}, not {EXIT_PREEMPTED} (saved and stopped)")
        print(f"# every rank saved the checkpoint and exited {EXIT_PREEMPTED}, the code Slurm scripts requeue on",
              flush=True)

    def finetune(self) -> None:
        self.header(5, "linear probe, fine-tune, distillation (one process each)")
        manifest = f"data.manifest={_display_path(self.shards / 'manifest.json')}"
        config = ROOT / "configs" / "finetune"
        common = [manifest, "data.num_workers=0", "overwrite=true"]
        launch = [self.python, ROOT / "launch" / "finetune.py", "--config"]
        init = f"init={_display_path(self.run_dir)}"
        self.timed("probe", lambda: self.run([*launch, config / "linear_probe.yaml", init,
                                              f"output_dir={_display_path(self.out / 'probe')}",
                                              *common, *self.scale.probe]))
        self.timed("finetune", lambda: self.run([*launch, config / "finetune.yaml", init,
                                                 f"output_dir={_display_path(self.out / 'finetune')}",
                                                 *common, *self.scale.finetune]))
        self.timed("distill", lambda: self.run([*launch, config / "distill.yaml",
                                                f"distill.teacher={_display_path(self.out / 'finetune')}",
                                                f"output_dir={_display_path(self.out / 'distill')}",
                                                *common, *self.scale.distill]))

    def sample(self) -> None:
        self.header(6, "image completions and unconditional samples")
        if self.scale.sample is None:
            print("# skipped: this recipe pretrains next_patch, which regresses normalized patches and cannot sample; "
                  "a next_pixel run samples with launch/sample.py --init RUN_DIR", flush=True)
            return
        self.run([self.python, ROOT / "launch" / "sample.py", "--init", self.run_dir, "--out", self.samples,
                  *self.scale.sample])

    # ---- summary -----------------------------------------------------------------------------

    def summary(self, total_seconds: float) -> dict:
        self.header(7, "summary")
        summary = collect_summary(self.out, self.timings, total_seconds, self.scale.name)
        for line in format_summary(summary):
            print(line)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nrun dir:      {_display_path(self.run_dir)}  (checkpoints, metrics.jsonl, config.yaml)")
        if self.scale.sample is not None:
            print(f"samples:      {_display_path(self.samples / 'completions.png')}, "
                  f"{_display_path(self.samples / 'unconditional.png')}")
        print(f"results:      {_display_path(self.out)}/{{probe,finetune,distill}}/results.json, "
              f"{_display_path(self.out / 'summary.json')}")
        print(f"tensorboard:  tensorboard --logdir {_display_path(self.out)}", flush=True)
        return summary


def collect_summary(out: Path, timings: dict[str, float], total_seconds: float, scale: str) -> dict:
    """The numbers the demo reports, each beside the baseline it must beat, read back from the files
    the steps wrote (pixels and from-scratch baselines were computed on the same split by the steps)."""
    from gpt_vision.export import load_pretrained

    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    probes = [r for r in rows if r["split"] == "probe"]
    results = {name: json.loads((out / name / "results.json").read_text()) for name in ("probe", "finetune", "distill")}
    pretrained = load_pretrained(out / "run")

    def baseline(name: str, kind: str) -> float | None:
        return results[name]["baselines"].get(kind, {}).get("top1")

    return {
        "scale": scale,
        "machine": _machine(),
        "pretrain": {
            "steps": train[-1]["step"],
            "parameters": pretrained.model.num_parameters(),
            "image_size": pretrained.model.config.image_size,
            "objective": pretrained.model.config.objective,
            # next_patch regresses patches: a loss (MSE) and no bits/dim
            "val_loss": val[-1]["loss"] if val else None,
            "val_bits_per_dim": val[-1].get("bits_per_dim") if val else None,
            "train_bits_per_dim": train[-1].get("bits_per_dim"),
            "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train),
            "online_probe": [{"step": r["step"], "top1": r["top1"]} for r in probes],
            "online_probe_pixels": next((r["pixels_top1"] for r in probes if "pixels_top1" in r), None),
        },
        "linear_probe": {"top1": results["probe"]["top1"], "layer": results["probe"]["chosen_layer"],
                         "parameters": results["probe"]["parameters"]["trainable"],
                         "pixels_top1": baseline("probe", "pixels")},
        "finetune": {"top1": results["finetune"]["top1"], "parameters": results["finetune"]["parameters"]["trainable"],
                     "scratch_top1": baseline("finetune", "scratch"), "pixels_top1": baseline("finetune", "pixels")},
        "distill": {"top1": results["distill"]["top1"], "teacher_top1": results["distill"]["teacher"]["top1"],
                    "labels_only_top1": baseline("distill", "labels_only"),
                    "parameters": results["distill"]["parameters"]["student"]},
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total_seconds, 1)},
    }


def format_summary(s: dict) -> list[str]:
    p, seconds = s["pretrain"], s["seconds"]
    if p["val_bits_per_dim"] is not None:
        fit = f"{p['val_bits_per_dim']:.3f} bits/dim"
    else:
        fit = f"{p['val_loss']:.3f} val MSE" if p["val_loss"] is not None else "n/a"
    probe, finetune, distill = s["linear_probe"], s["finetune"], s["distill"]
    lines = [
        f"{'what':<34} {'result':>14} {'must beat':>26} {'parameters':>12} {'wall time':>10}",
        f"{p['objective'] + ', ' + str(p['steps']) + ' steps':<34} {fit:>14} {'':>26} {p['parameters']:>12,} "
        f"{seconds.get('pretrain', 0):>9.0f}s",
    ]
    if p["online_probe"]:
        curve = " ".join(f"{_pct(r['top1'])}@{r['step']}" for r in p["online_probe"])
        lines.append(f"{'  online probe (subset)':<34} {curve}  (pixels {_pct(p['online_probe_pixels'])})")
    lines += [
        f"{'linear probe (layer ' + str(probe['layer']) + ')':<34} {_pct(probe['top1']):>14} "
        f"{_baseline('pixels', probe['pixels_top1']):>26} {probe['parameters']:>12,} {seconds.get('probe', 0):>9.0f}s",
        f"{'fine-tune':<34} {_pct(finetune['top1']):>14} "
        f"{_baseline('scratch', finetune['scratch_top1']) + ', ' + _baseline('probe', probe['top1']):>26} "
        f"{finetune['parameters']:>12,} "
        f"{seconds.get('finetune', 0):>9.0f}s",
        f"{'distilled student':<34} {_pct(distill['top1']):>14} "
        f"{_baseline('labels only', distill['labels_only_top1']):>26} {distill['parameters']:>12,} "
        f"{seconds.get('distill', 0):>9.0f}s",
        f"{'  its teacher (the fine-tune)':<34} {_pct(distill['teacher_top1']):>14}",
        f"{'pretraining throughput':<34} {p['tokens_per_s']:>14,.0f} tok/s",
        f"{'total':<34} {'':>14} {'':>26} {'':>12} {seconds['total']:>9.0f}s   ({s['machine']})",
    ]
    return lines


def _baseline(name: str, top1: float | None) -> str:
    return f"{name} {_pct(top1)}" if top1 is not None else f"{name} (not run)"


def write_idx_subset(source: Path, target: Path, counts: dict[str, int]) -> None:
    """The first `counts[split]` images and labels of each IDX split, as gzipped IDX files."""
    from data_shards.sources import read_idx

    target.mkdir(parents=True, exist_ok=True)
    for split, pattern in IDX_FILES.items():
        for kind, dims in (("images", 3), ("labels", 1)):
            name = pattern.format(kind, dims)
            array = read_idx(source / name, ndim=dims)[: counts[split]]
            header = struct.pack(">I", 0x0800 | dims) + b"".join(struct.pack(">I", d) for d in array.shape)
            with atomic_file(target / name) as raw, gzip.GzipFile(name, "wb", fileobj=raw) as handle:
                handle.write(header + array.astype("uint8").tobytes())


def _manifest_matches(manifest: Path, scale: Scale) -> bool:
    doc = json.loads(manifest.read_text())
    sizes = {split: entry.get("num_samples") for split, entry in doc.get("splits", {}).items()}
    return (doc.get("image_size") == [scale.image_size] * 2
            and sizes == {"train": scale.train_images, "test": scale.test_images})


def _pretrain_config(scale: Scale):
    """The PretrainConfig the demo's pretraining command runs with."""
    from gpt_vision.config_loader import load_config
    from gpt_vision.run_configs import PretrainConfig

    return load_config(PretrainConfig, str(ROOT / "configs/pretrain/fmnist_demo.yaml"), scale.pretrain)


# the settings that make a pretraining run the demo's recipe: a saved run that differs in any is not reused
RECIPE_KEYS = {"model": ("objective", "image_size", "patch_size", "n_layer", "n_embd", "n_head"),
               "train": ("steps", "global_batch_size"), "optim": ("lr",), "schedule": ("warmup_steps",)}


def _recipe_changes(saved_config: Path, scale: Scale) -> list[str]:
    """`section.key: was -> now` for each model or schedule setting where an existing run differs from
    the demo's recipe: a run from an older demo would otherwise be reused, or resumed (a shorter one on
    a learning-rate schedule stretched partway through), as if it were this one."""
    import dataclasses

    import yaml

    if not saved_config.is_file():
        return []
    saved = yaml.safe_load(saved_config.read_text()) or {}
    config = _pretrain_config(scale)
    wanted = {"model": {**dataclasses.asdict(config.model.resolved()), "image_size": scale.image_size},
              "train": dataclasses.asdict(config.train), "optim": dataclasses.asdict(config.optim),
              "schedule": dataclasses.asdict(config.schedule)}
    changes = []
    for section, keys in RECIPE_KEYS.items():
        was, now = saved.get(section) or {}, wanted[section]
        changes += [f"{section}.{key}: {was.get(key)} -> {now[key]}" for key in keys if was.get(key) != now[key]]
    return changes


def _step_of(step_dir: Path) -> int:
    return int(step_dir.name.split("-")[1])


def _children(pid: int) -> list[int]:
    """Direct child processes (the ranks), read from /proc/<pid>/stat."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def _machine() -> str:
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cores} CPU cores, {device}, torch {torch.__version__}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _display_path(path: Path | str) -> str:
    """Paths under the repository are shown relative to it (the commands run from there)."""
    path = Path(path)
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT)) if path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def _display(arg: str) -> str:
    return _display_path(arg) if arg.startswith(str(ROOT)) else arg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=os.environ.get("DEMO_SCALE") == "small",
                        help="a few hundred images and a few dozen steps (also: DEMO_SCALE=small)")
    parser.add_argument("--out", type=Path, help="output folder (default: demo_out, or demo_out/small)")
    parser.add_argument("--idx-dir", type=Path, default=FASHION_MNIST_DIR,
                        help="folder with the Fashion-MNIST IDX files (default: the Debian package's)")
    parser.add_argument("--nproc", type=int, default=2, help="pretraining processes")
    args = parser.parse_args(argv)
    scale = SMALL if args.small else FULL
    out = (args.out or ROOT / ("demo_out/small" if args.small else "demo_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(scale, out, args.nproc)
    started = time.monotonic()
    print(f"gpt_vision demo ({scale.name}): output in {_display_path(out)}", flush=True)
    print("=== 1. environment: the virtual environment is set up by `make venv` ===", flush=True)
    try:
        if args.idx_dir == FASHION_MNIST_DIR:
            demo.ensure_dataset()
        demo.timed("shards", lambda: demo.write_shards(args.idx_dir))
        demo.timed("pretrain", demo.pretrain)
        demo.finetune()
        demo.timed("sample", demo.sample)
        demo.summary(time.monotonic() - started)
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
