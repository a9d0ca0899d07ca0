"""Config sections owned by the data package: the shard stream (`DataConfig`) and the palette
tokenizer (`TokenizerConfig`)."""

from dataclasses import dataclass, field

from gpt_vision.errors import ConfigError

VERIFY_MODES = ("hash", "size", "off")


@dataclass
class AugmentConfig:
    """Per-sample image transforms, applied after decoding and before tokenizing (fine-tuning)."""

    random_crop_padding: int = 0
    flip: bool = False
    resize: int = 0
    center_crop: int = 0

    def check(self) -> None:
        for name in ("random_crop_padding", "resize", "center_crop"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(name, f"must be >= 0 (0 disables it), got {value}")


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed, shuffled and policed for bad samples."""

    manifest: str = ""
    train_split: str = "train"
    val_split: str = "test"
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    max_bad_fraction: float = 0.01
    bad_window: int = 1000
    allow_pipe: bool = False
    verify: str = "hash"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self) -> None:
        if not self.manifest:
            raise ConfigError("manifest", "is required: a path to manifest.json (or its directory) or a URL")
        if not self.train_split or not self.val_split:
            raise ConfigError("train_split" if not self.train_split else "val_split", "must name a split of the manifest")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"must be >= 0 (0 or 1 = no shuffle), got {self.shuffle_buffer}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.bad_window < 1:
            raise ConfigError("bad_window", f"must be >= 1, got {self.bad_window}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError("verify", f"is {self.verify!r}, expected one of {', '.join(VERIFY_MODES)}")
        try:
            self.augment.check()
        except ConfigError as error:
            raise error.under("augment") from None


@dataclass
class TokenizerConfig:
    """The k-means color palette: K clusters fitted on a pixel sample of the training split."""

    clusters: int = 16
    sample_pixels: int = 200000
    iterations: int = 30
    seed: int = 0
    path: str = ""

    def check(self) -> None:
        if not 2 <= self.clusters <= 65536:
            raise ConfigError("clusters", f"must be in [2, 65536], got {self.clusters}")
        if self.sample_pixels < self.clusters:
            raise ConfigError(
                "sample_pixels", f"must be >= clusters ({self.clusters}), got {self.sample_pixels}"
            )
        if self.iterations < 1:
            raise ConfigError("iterations", f"must be >= 1, got {self.iterations}")
