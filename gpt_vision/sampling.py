"""`launch/sample.py`: iGPT-style image completions and unconditional samples as PNG grids.

Completions give the model the top half of held-out images and let it draw the bottom half,
`--per-image` times each; every grid row is [prompt, completions..., original]. All images are
palette tokens decoded through the checkpoint's own palette (the "original" is the quantized image
the model was trained to predict). When `--init` names a run (or one of its steps) the grids also go
to the run's TensorBoard as images, at the checkpoint's step.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gpt_vision import layout
from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.layout import Kind
from gpt_vision.train.metrics import image_grid

COMPLETIONS_PNG = "completions.png"
UNCONDITIONAL_PNG = "unconditional.png"
TOKENS_FILE = "tokens.npz"
PROMPT_FILL = 128  # gray shown where the prompt column hides the bottom half
TB_PREFIX = "sampling"
MIN_CELL_PIXELS = 56  # small images are upscaled (nearest) to at least this many pixels per side


@dataclass
class SampleOptions:
    completions: int = 8
    samples: int = 16
    per_image: int = 4
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    scale: int = 0  # 0: smallest integer factor reaching MIN_CELL_PIXELS

    def check(self) -> None:
        for name in ("completions", "samples", "scale"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.per_image < 1:
            raise UserError(f"--per-image must be >= 1, got {self.per_image}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.completions == 0 and self.samples == 0:
            raise UserError("nothing to draw: --completions and --samples are both 0")


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [N, H, W, C] by an integer factor."""
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def cell_scale(image_size: int, requested: int) -> int:
    return requested or max(1, -(-MIN_CELL_PIXELS // image_size))


def grid_shape(count: int, columns: int, image_size: int, scale: int) -> tuple[int, int]:
    """(height, width) of the PNG written for `count` images in `columns` columns."""
    side = image_size * scale
    rows = -(-count // columns)
    return rows * (side + 2) + 2, columns * (side + 2) + 2


def first_images(manifest: str, split: str, count: int, palette: Palette) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of `split` in shard order, as tokens [N, H*W], and their labels."""
    from gpt_vision.data.config import DataConfig
    from gpt_vision.data.stream import ShardLoader

    cfg = DataConfig(manifest=manifest, train_split=split, val_split=split, num_workers=0)
    loader = ShardLoader(cfg, split, palette, batch_size=count, train=False)
    for batch in loader:
        return batch["tokens"], batch["label"]
    raise UserError(f"{manifest}: split '{split}' has no readable images")


def draw_completions(model, tokens: torch.Tensor, per_image: int, opts: SampleOptions,
                     generator: torch.Generator) -> torch.Tensor:
    """[N, per_image, H*W] tokens whose first half (the prompt rows) are the given images'."""
    size = model.config.image_size
    prompt = tokens[:, : (size // 2) * size].repeat_interleave(per_image, dim=0)
    out = model.generate(prompt, temperature=opts.temperature, top_k=opts.top_k, generator=generator)
    return out.reshape(tokens.shape[0], per_image, -1).cpu()


def completion_rows(palette: Palette, originals: torch.Tensor, completions: torch.Tensor, size: int) -> np.ndarray:
    """uint8 [N * (K+2), H, W, C]: per image its prompt (bottom gray), K completions, the original."""
    n, k, _ = completions.shape
    channels = palette.channels
    originals_px = palette.decode(originals).reshape(n, 1, size, size, channels).numpy()
    completed_px = palette.decode(completions).reshape(n, k, size, size, channels).numpy()
    prompt_px = originals_px.copy()
    prompt_px[:, :, size // 2:] = PROMPT_FILL
    return np.concatenate([prompt_px, completed_px, originals_px], axis=1).reshape(n * (k + 2), size, size, channels)


def save_png(grid: np.ndarray, path: Path) -> None:
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with layout.atomic_file(path) as handle:
        image.save(handle, format="PNG")


def _manifest_and_split(step_dir: Path | None, given: str | None, split: str | None) -> tuple[str, str]:
    data = (layout.read_meta(step_dir).get("config") or {}).get("data", {}) if step_dir else {}
    manifest = given or data.get("manifest")
    if not manifest:
        raise UserError("completions need held-out images: give --data-manifest (the checkpoint names no shards), "
                        "or --completions 0")
    return manifest, split or data.get("val_split") or "test"


def _load(init: str, palette_file: str | None):
    from gpt_vision.export import load_pretrained

    pretrained = load_pretrained(init)
    palette = Palette.load(palette_file) if palette_file else pretrained.palette
    if palette is None:
        raise UserError(f"{init} carries no palette.npy; give --palette FILE (the palette it was trained with)")
    model = pretrained.model
    if model.config.objective != "next_pixel":
        raise UserError(f"{init} was trained with objective {model.config.objective}; sampling needs next_pixel")
    if palette.size != model.config.vocab_size or palette.channels != model.config.channels:
        raise UserError(f"palette has {palette.size} colors x {palette.channels} channels but the model expects "
                        f"{model.config.vocab_size} x {model.config.channels}")
    return model.eval(), palette


def sample(init: str, out: Path, opts: SampleOptions, data_manifest: str | None = None, split: str | None = None,
           palette_file: str | None = None, device: str = "cpu", tensorboard: bool = True) -> dict:
    """Draw the grids into `out`; returns what was written (also saved as `out/samples.json`)."""
    opts.check()
    found = layout.resolve_init(init)
    step_dir = found.path if found.kind is Kind.STEP else None
    model, palette = _load(init, palette_file)
    model.to(device)
    size = model.config.image_size
    scale = cell_scale(size, opts.scale)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    summary: dict = {"init": str(init), "image_size": size, "scale": scale, "temperature": opts.temperature,
                     "top_k": opts.top_k, "seed": opts.seed, "files": {}}
    arrays: dict[str, np.ndarray] = {}
    grids: dict[str, tuple[np.ndarray, int]] = {}  # name -> (cells [N, H, W, C], columns)
    if opts.completions:
        manifest, split = _manifest_and_split(step_dir, data_manifest, split)
        originals, labels = first_images(manifest, split, opts.completions, palette)
        completions = draw_completions(model, originals, opts.per_image, opts, generator)
        grids["completions"] = (completion_rows(palette, originals, completions, size), opts.per_image + 2)
        arrays.update(originals=originals.numpy(), labels=labels.numpy(), completions=completions.numpy())
        summary.update(completions=int(originals.shape[0]), per_image=opts.per_image, split=split, manifest=manifest)
    if opts.samples:
        tokens = model.generate(opts.samples, temperature=opts.temperature, top_k=opts.top_k, generator=generator).cpu()
        cells = palette.decode(tokens).reshape(opts.samples, size, size, palette.channels).numpy()
        grids["unconditional"] = (cells, min(8, opts.samples))
        arrays["unconditional"] = tokens.numpy()
        summary["samples"] = opts.samples

    out.mkdir(parents=True, exist_ok=True)
    for name, (cells, columns) in grids.items():
        path = out / (COMPLETIONS_PNG if name == "completions" else UNCONDITIONAL_PNG)
        save_png(image_grid(upscale(cells, scale), columns), path)
        summary["files"][name] = str(path)
    with layout.atomic_file(out / TOKENS_FILE) as handle:
        np.savez(handle, **arrays)
    summary["files"]["tokens"] = str(out / TOKENS_FILE)
    if tensorboard and found.run_dir is not None:
        logdir = found.run_dir / layout.TENSORBOARD_DIR
        step = int(layout.read_meta(step_dir)["step"])
        _to_tensorboard(logdir, step, {k: image_grid(*v) for k, v in grids.items()})
        summary["tensorboard"] = {"logdir": str(logdir), "step": step, "tags": [f"{TB_PREFIX}/{name}" for name in grids]}
    layout.write_atomic(out / "samples.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _to_tensorboard(logdir: Path, step: int, grids: dict[str, np.ndarray]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        for name, grid in grids.items():
            writer.add_image(f"{TB_PREFIX}/{name}", grid, step, dataformats="HWC")
    finally:
        writer.close()


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    return name


def main(argv: list[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Draw image completions and unconditional samples "
                                     "from a pretrained next-pixel model as PNG grids.")
    parser.add_argument("--init", required=True, help="a run dir, step dir or export dir")
    parser.add_argument("--out", help="output folder (default: <run dir>/samples/step-NNNNNNN)")
    parser.add_argument("--completions", type=int, default=8, help="held-out images whose bottom half is drawn (0: none)")
    parser.add_argument("--per-image", type=int, default=4, help="completions drawn per image")
    parser.add_argument("--samples", type=int, default=16, help="unconditional samples (0: none)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest colors only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-manifest", help="shards for the completions' prompts (default: the run's data.manifest)")
    parser.add_argument("--split", help="split to take prompts from (default: the run's data.val_split, else test)")
    parser.add_argument("--palette", help="palette .npy (default: the one saved with the checkpoint)")
    parser.add_argument("--scale", type=int, default=0, help=f"PNG upscaling factor (0: to >= {MIN_CELL_PIXELS} px per image)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: token-by-token decoding of small models is latency-bound, and "
                        "extra threads slow it down on a busy machine; 0 = torch's default)")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not add the grids to the run's TensorBoard")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    opts = SampleOptions(completions=args.completions, samples=args.samples, per_image=args.per_image,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed, scale=args.scale)
    opts.check()
    out = Path(args.out) if args.out else None
    if out is None:
        found = layout.resolve_init(args.init)
        if found.run_dir is None:
            raise UserError(f"--out is required when --init is not a run or one of its steps ({args.init})")
        out = found.run_dir / "samples" / found.path.name
    summary = sample(args.init, out, opts, args.data_manifest, args.split, args.palette, _device(args.device),
                     tensorboard=not args.no_tensorboard)
    for name, path in summary["files"].items():
        print(f"{name}: {path}")
    if "tensorboard" in summary:
        tb = summary["tensorboard"]
        print(f"tensorboard: {', '.join(tb['tags'])} at step {tb['step']} in {tb['logdir']}")
    return 0
