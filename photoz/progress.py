"""The one progress reporter of long jobs (simulate, train, predict).

tqdm draws it where tqdm is installed (the training extra); elsewhere (a
serving-only install running ``photoz predict``) one line on stderr is
rewritten in place. ``enabled=False`` reports nothing.
"""
from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class Progress:
    """Count ``total`` items, starting from ``initial`` already done; ``update(k)`` as work finishes."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True) -> None:
        self.total, self.done, self.desc, self.unit, self.enabled = total, initial, desc, unit, enabled
        self._start, self._base = time.perf_counter(), initial
        self._bar: Any = None
        self._postfix = ""
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, smoothing=0.05)

    def postfix(self, **values: str) -> None:
        """Extra figures shown beside the count (loss, rate...)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def update(self, k: int) -> None:
        self.done += k
        if self._bar is not None:
            self._bar.update(k)
        elif self.enabled:
            rate = (self.done - self._base) / max(time.perf_counter() - self._start, 1e-9)
            line = f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s {self._postfix}"
            sys.stderr.write("\r" + line)
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
