"""One progress display per job on stderr: loading, encoding, sampling, decoding.

A single tqdm bar is reset at each phase, so a person sees what is happening and how far
it is: loading counts tensors, sampling counts denoiser calls over the whole job with the
batch in the label, encoding and decoding name their batch. A full-size UNet call takes
seconds on a CPU, so a ticker redraws the line every second: the elapsed time keeps
moving and the display is never silent.
"""

from __future__ import annotations

import sys
import threading
from typing import Any


class JobProgress:
    """Phase-by-phase progress; use as a context manager around the job."""

    def __init__(self, *, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=None, desc="importing torch", file=sys.stderr, disable=not enabled, leave=False
        )
        self.label: str | None = None
        self.total: int | None = None
        self.batch, self.batches = 0, 1
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if enabled else None

    def __enter__(self) -> JobProgress:
        if self._ticker is not None:
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker.is_alive():
            self._ticker.join()
        self.bar.close()

    def _tick(self, interval: float = 1.0) -> None:
        while not self._stop.wait(interval):
            self.bar.refresh()

    def phase(self, name: str, total: int | None = None, unit: str = "it") -> None:
        """Start phase ``name`` with ``total`` units (None: unknown)."""
        self.label = self._label(name) if name in ("sampling", "decoding") else name
        self.total = total
        self.bar.reset()
        self.bar.total = total  # reset(total=None) would keep the old total
        self.bar.unit = unit
        self.bar.set_description_str(self.label, refresh=True)

    def loading(self, done: int, total: int) -> None:
        """``load_model(progress=...)``: ``done`` of ``total`` tensors read."""
        if self.label != "loading" or self.total != total:
            self.phase("loading", total, "tensor")
        self.bar.update(done - self.bar.n)

    def on_phase(self, name: str) -> None:
        """``generate(on_phase=...)``; sampling starts with its first step record."""
        if name != "sampling":
            self.phase(name)

    def on_step(self, record: Any) -> None:
        """``generate(callback=...)``: a :class:`~sdstack.generate.StepRecord`."""
        self.batch, self.batches = record.batch, record.batches
        if self.label != self._label("sampling") or self.total != record.total:
            self.phase("sampling", record.total, "step")
        self.bar.update(record.step - self.bar.n)
        if record.step == record.total:
            self.bar.refresh()  # show the last step even within tqdm's mininterval

    def _label(self, name: str) -> str:
        return name if self.batches == 1 else f"{name} {self.batch + 1}/{self.batches}"

    def write(self, text: str) -> None:
        """Print ``text`` on stdout without breaking the bar."""
        self.bar.write(text, file=sys.stdout)
