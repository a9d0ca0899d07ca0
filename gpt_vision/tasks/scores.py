"""Classification scores of a fine-tune run, with class names beside every per-class number, and
the images TensorBoard shows of them."""
from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict:
    """top1, top5 (top-k with k = min(5, classes)), per-class accuracy by class name and the
    confusion matrix (rows: true class, columns: predicted, both in the order of `classes`)."""
    num_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    predicted = logits.argmax(axis=1)
    k = min(5, num_classes)
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    return {
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "top5": float((topk == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "per_class": {name: float(confusion[c, c] / support[c]) if support[c] else None
                      for c, name in enumerate(classes)},
        "confusion": confusion.tolist(),
        "classes": list(classes),
        "samples": int(len(labels)),
    }


def confusion_image(confusion: np.ndarray, cell: int = 12) -> np.ndarray:
    """Row-normalized confusion matrix as a grayscale heat map (white = all of the row), HWC uint8."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = np.kron(np.rint(rows * 255).astype(np.uint8), np.ones((cell, cell), dtype=np.uint8))
    return np.repeat(image[:, :, None], 3, axis=2)


def bar_chart(values: list[float], bar: int = 12, height: int = 100) -> np.ndarray:
    """Values in [0, 1] as vertical bars (one per layer, left to right), HWC uint8; the best is red."""
    image = np.full((height, bar * len(values) + 2, 3), 255, dtype=np.uint8)
    best = int(np.argmax(values))
    for i, value in enumerate(values):
        top = height - int(round(max(0.0, min(1.0, value)) * (height - 1)))
        color = (200, 30, 30) if i == best else (60, 60, 60)
        image[top:, 2 + i * bar: i * bar + bar - 1] = color
    return image


def summary(kind: str, results: dict) -> str:
    """One line: the model's accuracy and every baseline's beside it."""
    layer = f" layer {results['chosen_layer']}" if results.get("chosen_layer") is not None else ""
    parts = [f"{kind}{layer}: top1 {results['top1']:.4f} top5 {results['top5']:.4f}"]
    if "teacher" in results:
        parts.append(f"teacher {results['teacher']['top1']:.4f}")
    parts += [f"{name} {scores['top1']:.4f}" for name, scores in results.get("baselines", {}).items()]
    return " | ".join(parts) + f" ({results['samples']} test samples, {results['wall_time_s']:.0f}s)"
