"""Run output on rank 0: a tqdm bar, log.txt, metrics.jsonl, and the attached trackers (TensorBoard, W&B: see
trackers.py); and the running loss and throughput between two log lines."""
from __future__ import annotations

import json
import math
import os
import time

from tqdm import tqdm


class RunLogger:
    """Writes nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, run_dir: str | None, enabled: bool, total_steps: int = 0, initial_step: int = 0,
                 progress: bool = True):
        self.enabled = enabled and run_dir is not None
        self.bar = None
        self.trackers = []
        self._log = self._metrics = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._log = open(os.path.join(run_dir, "log.txt"), "a", buffering=1)
        # On resume, lines for steps after the checkpoint may repeat; the later line for a step wins.
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        (self.bar.write if self.bar is not None else print)(msg)
        self._log.write(f"[{stamp}] {msg}\n")

    def metrics(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.scalars(step, numbers)

    def attach(self, trackers: list) -> None:
        """Send metrics and images to these trackers too (rank 0's; ignored elsewhere)."""
        if self.enabled:
            self.trackers = list(trackers)

    def image(self, step: int, tag: str, grid) -> None:
        """A uint8 (H, W, 3) image, such as a sample grid, to the trackers."""
        for tracker in self.trackers:
            tracker.image(step, tag, grid)

    def resume_at(self, step: int) -> None:
        """Start the bar at `step` (a resumed run)."""
        if self.bar is not None:
            self.bar.n = step

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self._log.close()
        self._metrics.close()


class ProgressWindow:
    """Mean loss and throughput over the steps since the last log line. Non-finite (skipped) steps count in neither."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.start = 0.0, 0, time.time()

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.loss += loss
            self.steps += 1

    def summary(self, images_per_step: int) -> dict:
        """{loss, steps_per_s, img_per_s} of the window (the loss mean over at least one step)."""
        seconds = time.time() - self.start
        steps = max(self.steps, 1)
        return {"loss": self.loss / steps, "steps_per_s": steps / seconds, "img_per_s": steps * images_per_step / seconds}
