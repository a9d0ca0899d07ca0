"""Counting bad samples by kind and stopping when they become too frequent.

A few bad images in a large set are skipped and logged; a set that is mostly broken (wrong
manifest, wrong mode, half-written shards) stops the run with the shard and key to look at.
"""

import logging
from collections import Counter, deque

from gpt_vision.errors import UserError

log = logging.getLogger(__name__)


class BadSampleTracker:
    """Raises once more than `max_fraction * window` of the last `window` samples were bad
    (measured against the full window, so one early bad sample does not stop a run)."""

    def __init__(self, window: int, max_fraction: float, split: str):
        self.window = window
        self.max_fraction = max_fraction
        self.split = split
        self.counts: Counter[str] = Counter()
        self._recent: deque[bool] = deque(maxlen=window)
        self._bad_in_window = 0

    def good(self) -> None:
        self._push(False)

    def bad(self, kind: str, shard: str, key: str, detail: str) -> None:
        self.counts[kind] += 1
        self._push(True)
        log.warning("skipped bad sample %r in shard %s: %s", key, shard, detail)
        if self._bad_in_window > self.max_fraction * self.window:
            raise UserError(
                f"too many bad samples in split '{self.split}': {self._bad_in_window} of the last "
                f"{self.window} (data.max_bad_fraction={self.max_fraction}); latest: {detail} "
                f"(key '{key}' in shard {shard})"
            )

    def _push(self, is_bad: bool) -> None:
        if len(self._recent) == self.window:
            self._bad_in_window -= self._recent[0]
        self._recent.append(is_bad)
        self._bad_in_window += is_bad
