"""The raw-pixel baseline every learned result is printed beside: the linear probe's own trainer on
standardized pixels, on the same fit/validation carve of the same training split and the same test
samples (both checked by key), at the same image size (the same eval-time resize/crop)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from gpt_vision.tasks.harness import FinetuneHarness
from gpt_vision.tasks.linear import carve, probe_logits, train_linear

# The pixel baseline's L2 sweep always covers these (and every task.probe_l2 value), so narrowing the
# model probe's sweep to save time never weakens the baseline it is compared with.
PIXEL_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def keys_digest(keys) -> str:
    """A short digest of sample keys in order: equal digests = the same samples."""
    return hashlib.sha256("\n".join(map(str, keys)).encode()).hexdigest()[:16]


@torch.no_grad()
def read_pixels(harness: FinetuneHarness, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, labels and float pixels [N, 1, H*W*C] of one eval pass over `split`."""
    keys, labels, pixels = [], [], []
    for batch in harness.eval_loader(split):
        keys.extend(batch["key"])
        labels.append(batch["label"])
        pixels.append(batch["pixels"].reshape(len(batch["key"]), 1, -1).float())
    return keys, torch.cat(labels).to(harness.device), torch.cat(pixels).to(harness.device)


def pixel_baseline(harness: FinetuneHarness, test_keys: list[str], train_keys: list[str] | None = None) -> dict:
    """Test scores of a linear classifier on pixels; raises if its samples differ from the model's."""
    cfg = harness.cfg
    keys, labels, x = read_pixels(harness, cfg.data.train_split)
    if train_keys is not None and keys != list(train_keys):
        raise RuntimeError("the pixel baseline read the training split in a different order than the model")
    fit_idx, val_idx = carve(len(keys), cfg.task.val_fraction, cfg.seed)
    l2_values = sorted(set(PIXEL_L2) | set(cfg.task.probe_l2))
    fitted = train_linear(harness, x, labels, fit_idx, val_idx, tag="baseline_pixels", l2_values=l2_values)
    test_keys_read, test_labels, test_x = read_pixels(harness, cfg.data.test_split)
    if test_keys_read != list(test_keys):
        raise RuntimeError("the pixel baseline read different test samples than the model")
    logits = probe_logits(fitted.probe.select(0), test_x, cfg.train.eval_batch_size)[:, 0]
    harness.baseline_logits["pixels"] = logits.cpu().numpy()
    return {
        **harness.scores(test_labels.cpu().numpy(), logits.cpu().numpy()),
        "val_accuracy": fitted.val_accuracy[0] if fitted.val_accuracy else None,
        "train_loss": fitted.train_loss[0], "l2": fitted.l2[0],
        "fit_keys": keys_digest(np.asarray(keys)[fit_idx]), "test_keys": keys_digest(test_keys_read),
    }
