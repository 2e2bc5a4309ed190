"""Where training metrics go: a CSV file, TensorBoard (tensorboardX, no TensorFlow) and W&B.

Only process 0 writes. ``MetricWriter.write(step, metrics)`` fans a dict of scalars
out to every enabled sink; ``write_image`` logs a HWC uint8 image.
"""
from __future__ import annotations

import csv
import os

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, *, use_csv: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "cfm-jax", wandb_name: str = "",
                 config_dict: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._csv_path = os.path.join(workdir, "metrics.csv") if use_csv else None
        self._csv_fields: list[str] | None = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise ImportError("logging.wandb=True needs the `wandb` package: `pip install wandb` "
                                  "(it is not in requirements.txt), or set --config.logging.wandb=False.") from e
            self._wandb = wandb_lib.init(project=wandb_project, name=wandb_name or None, dir=workdir,
                                         config=config_dict, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        if self._csv_path:
            self._write_csv(step, scalars)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _write_csv(self, step: int, scalars: dict) -> None:
        row = {"step": step, **scalars}
        exists = os.path.exists(self._csv_path) and os.path.getsize(self._csv_path) > 0
        if self._csv_fields is None and exists:
            with open(self._csv_path, newline="") as f:
                self._csv_fields = next(csv.reader(f), None)
        fields = self._csv_fields or list(row)
        new_keys = [k for k in row if k not in fields]
        if new_keys:  # a new metric appears (e.g. validation): rewrite with the wider header
            fields = fields + new_keys
            rows = []
            if exists:
                with open(self._csv_path, newline="") as f:
                    rows = list(csv.DictReader(f))
            with open(self._csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
            exists = True
        self._csv_fields = fields
        with open(self._csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if not exists:
                w.writeheader()
            w.writerow(row)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb as wandb_lib
            self._wandb.log({tag: wandb_lib.Image(np.asarray(image))}, step=step)

    def flush(self) -> None:
        """Writes pending TensorBoard events to disk (the CSV is written row by row)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
