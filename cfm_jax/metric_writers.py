"""Where training metrics go: a CSV file, TensorBoard (tensorboardX, no TensorFlow) and W&B.

Only process 0 writes. ``MetricWriter.write(step, metrics)`` fans a dict of scalars
out to every enabled sink; ``write_image`` logs a HWC uint8 image.

A resumed run redoes the steps after its checkpoint, which an earlier, interrupted run may
have logged already: ``resume_step`` drops those rows from ``metrics.csv`` and starts a new
TensorBoard event file with a purge marker (``SessionLog.START`` at ``resume_step + 1``,
tensorboardX's ``purge_step``), on which TensorBoard hides the older files' events from that
step on, so each step is shown once. W&B (``resume="allow"``) ignores steps lower than ones it
already holds instead.

A work directory in a bucket gets its metric files through :class:`LogMirror`.
"""
from __future__ import annotations

import csv
import os
import time

import jax
import numpy as np
from etils import epath


class _EventFile:
    """One TensorBoard event file written in the calling thread (tensorboardX's ``EventsWriter``).

    tensorboardX's ``SummaryWriter`` writes from a background thread: a failed write (a full
    disk) ends that thread with a traceback of its own, and its bounded queue then blocks the
    next write forever. Here a failed write raises in the trainer, which reports it."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter  # lazy: tensorboardX imports torch if installed (slow)
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        self._event = Event
        os.makedirs(logdir, exist_ok=True)
        # the process id in the name: a restart within the same second gets a file of its own
        self._file = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}")
        if purge_step is not None:
            self._file.write_event(Event(wall_time=time.time(), step=purge_step,
                                         session_log=SessionLog(status=SessionLog.START)))

    def add(self, step: int, summary) -> None:
        self._file.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    def __init__(self, workdir: str, *, use_csv: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "cfm-jax", wandb_name: str = "",
                 config_dict: dict | None = None, resume_step: int | None = None):
        """``resume_step``: the step the run starts from; metrics an earlier run logged after it
        are dropped (CSV rows) or hidden (TensorBoard purge marker)."""
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._csv_path = os.path.join(workdir, "metrics.csv") if use_csv else None
        self._csv_fields: list[str] | None = None
        self._tb = None  # the event file, opened at the first event (a run with nothing to do adds none)
        self._tb_args = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if self._csv_path and resume_step is not None:
            self._drop_csv_rows_after(resume_step)
        if tensorboard:
            tb_dir = os.path.join(workdir, "tensorboard")
            earlier = os.path.isdir(tb_dir) and any(n.startswith("events.") for n in os.listdir(tb_dir))
            self._tb_args = (tb_dir, resume_step + 1 if earlier and resume_step is not None else None)
        if wandb:
            try:
                import wandb as wandb_lib  # lazy: optional, not in requirements.txt
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
        if self._event_file() is not None:
            from tensorboardX.summary import scalar  # lazy: tensorboardX imports torch if installed
            for k, v in scalars.items():
                self._tb.add(step, scalar(k, v))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _event_file(self) -> _EventFile | None:
        if self._tb is None and self._tb_args is not None:
            self._tb = _EventFile(*self._tb_args)
        return self._tb

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
                    rows = [[r.get(k, "") for k in fields] for r in csv.DictReader(f)]
            self._replace_csv(fields, rows)
            exists = True
        self._csv_fields = fields
        with open(self._csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if not exists:
                w.writeheader()
            w.writerow(row)

    def _drop_csv_rows_after(self, step: int) -> None:
        """Removes the rows of steps after ``step`` (logged by a run that stopped past its last
        checkpoint; the resumed run logs them again), keeping the header."""
        if not os.path.exists(self._csv_path):
            return
        with open(self._csv_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
        if not header or "step" not in header:
            return
        col = header.index("step")

        def keep(row):
            try:
                return int(float(row[col])) <= step
            except (IndexError, ValueError):  # a torn last line of a killed run
                return False
        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows):
            self._replace_csv(header, kept)

    def _replace_csv(self, header: list[str], rows: list[list]) -> None:
        """Rewrites the CSV through a temporary file and a rename: a crash leaves the old or the new file."""
        tmp = self._csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        os.replace(tmp, self._csv_path)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if not self.enabled:
            return
        if self._event_file() is not None:
            from tensorboardX.summary import image as image_summary  # lazy: as in write
            self._tb.add(step, image_summary(tag, np.asarray(image), dataformats="HWC"))
            self._tb.flush()
        if self._wandb is not None:
            import wandb as wandb_lib  # lazy: optional, not in requirements.txt
            self._wandb.log({tag: wandb_lib.Image(np.asarray(image))}, step=step)

    def flush(self) -> None:
        """Writes pending TensorBoard events to disk (the CSV is written row by row)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        tb, wandb, self._tb, self._tb_args, self._wandb = self._tb, self._wandb, None, None, None
        if tb is not None:
            tb.close()
        if wandb is not None:
            wandb.finish()


class LogMirror:
    """The metric files (``metrics.csv``, ``tensorboard/``) of a bucket work directory.

    The writers append to local files, which a bucket cannot do, so a run whose work directory is
    a bucket URL writes them in a local folder (:meth:`local_dir`), pushes them to the bucket at
    every checkpoint and at the end, and on resuming fetches the bucket's copies that the local
    folder lacks (a resumed run on a new machine continues the same files).

    ``remote``: an ``etils.epath.Path`` (``gs://...``; any path works, which the tests use);
    ``log_dir``: the local folder.
    """

    def __init__(self, remote, log_dir: str):
        self.remote = remote
        self.log_dir = log_dir

    @staticmethod
    def local_dir(workdir: str, root: str = os.path.join("runs", "_logs")) -> str:
        """The local folder of a bucket work directory: ``runs/_logs/<bucket>/<path>``."""
        return os.path.abspath(os.path.join(root, str(workdir).split("://", 1)[-1].strip("/")))

    def fetch(self) -> None:
        """Copies the bucket's metric files into the local folder where it lacks them (local
        files are never overwritten)."""
        for src in _log_files(self.remote / "tensorboard") + [self.remote / "metrics.csv"]:
            if not src.exists():
                continue
            dst = os.path.join(self.log_dir, os.path.relpath(str(src), str(self.remote)))
            if not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as f:
                    f.write(src.read_bytes())

    def push(self) -> None:
        """Copies the local metric files to the bucket (replacing the bucket's copies)."""
        local = epath.Path(self.log_dir)
        for src in _log_files(local):
            dst = self.remote / os.path.relpath(str(src), self.log_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())


def _log_files(root) -> list:
    """Files in ``root`` and its direct sub-folders (metrics.csv, tensorboard/events...): no
    recursive glob, which bucket file systems do not offer."""
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir():
            out.extend(q for q in p.iterdir() if not q.is_dir())
        else:
            out.append(p)
    return out
