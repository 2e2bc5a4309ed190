"""Upsample images or latents of any generator with one or a cascade of CFM checkpoints.

    python -m cfm_jax.upsample --checkpoint runs/quickstart --input photo.png --out upsampled/
    python -m cfm_jax.upsample --checkpoint runs/cfm_64-128 --input sd15_latents.npz --out hires/ \\
        --first_stage checkpoints/sd_ae.ckpt --solver euler:40 --batch_size 4
    python -m cfm_jax.upsample --checkpoint runs/a --checkpoint runs/b --input lowres/ --out out/  # a cascade

Inputs (files or folders, mixed):

* images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``): square, a side divisible by the first
  stage's factor (8 for the SD VAE), equal to the first checkpoint's ``data.lowres_size``.
  They are encoded as the training records were: for PSU checkpoints the image is
  up-sampled bilinearly to the high-res size in pixels and encoded there (the
  ``latent_lowres`` of the records); for other coupling modes it is encoded as it is.
* latents (``.npy`` one array, ``.npz`` key ``latents`` or its only array), e.g. what an SD1.5
  / LCM pipeline returns with ``output_type="latent"``: ``[C, h, w]`` or ``[B, C, h, w]``
  (PyTorch layout) or ``[h, w, C]`` / ``[B, h, w, C]`` (``--latent_layout``); by default
  they are taken as *scaled* latents (multiplied by the VAE's scaling factor, as diffusers
  pipelines return them); ``--nolatents_scaled`` for raw posterior samples.

Every stage maps its input latent (``data.lowres_size / f`` cells) to its output latent
(``data.image_size / f``); in a cascade each stage's output must be the next stage's input
size. ``--any_resolution`` lifts that check (the UNet is convolutional) and applies each
stage's up-sampling factor to whatever size it receives. All checks run before any
network is evaluated; problems are listed together. Memory too: every program (encode,
each stage, decode) is compiled for every input shape first, and one that needs more than
the device has free (XLA's memory analysis against ``memory_stats()``, on CPU the host's
available memory) is refused with what could fit (a smaller batch or input, tiles).

Outputs: ``<out>/<name>.png`` per input (``<name>_<i>`` for the i-th latent of a batched
file) and, with ``--save_latents``, the final scaled latent ``<name>.npy`` [H, W, C]. The
final latent is decoded in overlapping tiles when it is larger than 128² cells
(``--decode_tile``), so a 2048² decode needs the memory of a 512² one.

It runs on one device (JAX's default); ``eval.py`` is the sharded, multi-host job.

Seeds: example ``i`` (in input order) of stage ``s`` draws its noise from
``fold_in(fold_in(PRNGKey(seed), i), s)`` alone, so results do not depend on the batch
size or on the other inputs (see :meth:`CFMUpsampler.sample`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from cfm_jax import checkpointing, cli, compile_options, sampling, sde
from cfm_jax.data import image_ops
from cfm_jax.data.image_io import IMAGE_EXTENSIONS, list_images, load_image
from cfm_jax.first_stage import build_first_stage, scale_latents
from cfm_jax.model import CFMUpsampler, check_params_fit_config
from cfm_jax.solvers import ALL_METHODS, SolverSpec

LATENT_EXTENSIONS = (".npy", ".npz")
AUTO_TILE_ABOVE = 128  # latent cells: larger final latents are decoded in tiles by default
AUTO_TILE = 64
AUTO_TILE_OVERLAP = 16


class UpsampleError(ValueError):
    """Bad input, checkpoint or option: raised before any compute, listing every problem."""

# --------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Stage:
    """One checkpoint of a cascade."""
    path: str
    config: Any
    upsampler: Any
    params: Any
    step: int | None

    @property
    def factor(self) -> int:
        return self.upsampler.first_stage.downsample_factor

    @property
    def in_latent(self) -> int:
        return self.config.data.lowres_size // self.factor

    @property
    def out_latent(self) -> int:
        return self.config.data.image_size // self.factor

    @property
    def scale(self) -> float:
        return self.config.data.image_size / self.config.data.lowres_size

    def describe(self) -> str:
        d = self.config.data
        return (f"{self.path}: {d.lowres_size}² -> {d.image_size}² pixels "
                f"({self.in_latent}² -> {self.out_latent}² latents)")


def _read_config(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UpsampleError(f"--checkpoint {path!r}: no config.json there. Pass a run directory written by "
                            "train.py or by `python -m cfm_jax.convert fmboost`.")
    with open(cfg_path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _first_stage_key(config) -> tuple:
    fs = config.first_stage
    return fs.name, fs.path, float(fs.scale_factor), float(fs.shift_factor), fs.dtype


def load_cascade(paths: Sequence[str], *, use_ema: bool = True, step: int | None = None,
                 first_stage_path: str | None = None, any_resolution: bool = False,
                 read_weights: bool = True) -> list[Stage]:
    """The stages of ``paths`` (configs checked first, then weights read), first stage shared."""
    if not paths:
        raise UpsampleError("No --checkpoint given.")
    configs, problems = [], []
    for p in paths:
        try:
            cfg = _read_config(p)
        except UpsampleError as e:
            problems.append(str(e))
            continue
        if first_stage_path and cfg.first_stage.name == "autoencoder":
            cfg.first_stage.path = first_stage_path
        configs.append(cfg)
    if problems:
        raise UpsampleError("\n".join(problems))
    keys = {_first_stage_key(c) for c in configs}
    if len(keys) > 1:
        raise UpsampleError("The checkpoints of a cascade must share one first stage (the latents of one "
                            f"stage are the input of the next); they use {sorted(keys)}.")
    for a, b, pa, pb in zip(configs, configs[1:], paths, paths[1:]):
        out_a, in_b = a.data.image_size, b.data.lowres_size
        if out_a != in_b and not any_resolution:
            problems.append(f"Stage {pa!r} outputs {out_a}² pixels but the next stage {pb!r} was trained on "
                            f"{in_b}² inputs: order the checkpoints by resolution, or pass --any_resolution to "
                            "apply a stage at a size it was not trained for.")
    if problems:
        raise UpsampleError("\n".join(problems))
    try:
        first_stage = build_first_stage(configs[0])
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UpsampleError(f"first stage: {e} (override the path with --first_stage)") from None
    stages = []
    for p, cfg in zip(paths, configs):
        try:
            ups = CFMUpsampler(cfg, first_stage=first_stage)
        except ValueError as e:
            raise UpsampleError(f"{p}: {e}") from None
        stages.append(Stage(path=p, config=cfg, upsampler=ups, params=None, step=step))
    if read_weights:
        read_stage_weights(stages, use_ema=use_ema, step=step)
    return stages


def read_stage_weights(stages: Sequence[Stage], *, use_ema: bool = True, step: int | None = None) -> None:
    """Reads (and shape-checks) every stage's weights in place."""
    for st in stages:
        try:
            st.params = checkpointing.read_params(st.path, use_ema=use_ema, step=step)
        except (FileNotFoundError, ValueError) as e:
            raise UpsampleError(f"{st.path}: {e}") from None
        try:
            check_params_fit_config(st.path, st.upsampler, st.params)
        except ValueError as e:
            raise UpsampleError(str(e)) from None


# --------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class InputItem:
    name: str  # output stem
    path: str
    kind: str  # "image" | "latent"
    index: int | None  # position in a batched latent file
    shape: tuple  # (h, w, c) as it will enter the first stage (latents NHWC)


def _latent_array(path: str):
    if path.endswith(".npz"):
        with np.load(path) as z:
            keys = list(z.keys())
            if "latents" in keys:
                return z["latents"]
            if len(keys) == 1:
                return z[keys[0]]
            raise UpsampleError(f"{path}: an .npz needs a 'latents' array or exactly one array; it holds {keys}.")
    return np.load(path, mmap_mode="r")


def _to_nhwc(arr, layout: str, channels: int, path: str) -> tuple[np.ndarray | None, str | None]:
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        return None, f"{path}: latents must be [C, h, w] or [B, C, h, w] (or channels-last), got shape {arr.shape}."
    if layout == "auto":
        if arr.shape[1] == channels and arr.shape[-1] != channels:
            layout = "nchw"
        elif arr.shape[-1] == channels and arr.shape[1] != channels:
            layout = "nhwc"
        elif arr.shape[1] == channels:
            layout = "nchw"  # ambiguous (c x c latents): PyTorch's layout
        else:
            return None, (f"{path}: latents of shape {arr.shape} have no axis of {channels} channels, which the "
                          f"first stage's latents have (wrong model or wrong file?).")
    arr = np.transpose(arr, (0, 2, 3, 1)) if layout == "nchw" else arr
    if arr.shape[-1] != channels:
        return None, (f"{path}: {arr.shape[-1]} latent channels ({layout.upper()}) but the first stage's latents have "
                      f"{channels}.")
    return arr, None


def scan_inputs(paths: Sequence[str], *, channels: int, latent_layout: str = "auto",
                stages: Sequence[Stage] | None = None, any_resolution: bool = False) -> list[InputItem]:
    """The inputs named by ``paths`` (files or folders), their shapes read without decoding;
    with ``stages`` also checked against the cascade (:func:`check_inputs`). Every problem
    found is reported in one :class:`UpsampleError`."""

    files, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            images, ignored = list_images(p)
            files += [os.path.join(p, f) for f in images]
            files += sorted(os.path.join(p, f) for f in ignored if f.lower().endswith(LATENT_EXTENSIONS))
        elif os.path.isfile(p):
            files.append(p)
        elif os.path.exists(p):
            problems.append(f"--input {p!r} is not a regular file or folder (a FIFO, socket or device); "
                            "give an image, a latent file or a folder.")
        else:
            problems.append(f"--input {p!r} does not exist.")
    items, names = [], set()
    for f in files:
        stem, ext = os.path.splitext(os.path.basename(f))
        ext = ext.lower()
        if ext in IMAGE_EXTENSIONS:
            if not os.path.isfile(f):  # opening a FIFO would block
                problems.append(f"{f}: not a regular file (a FIFO, socket or device); remove it.")
                continue
            try:
                with Image.open(f) as img:
                    w, h = img.size
                    img.verify()
            except Exception as e:  # noqa: BLE001 -- PIL raises many types for damaged files
                problems.append(f"{f}: not a readable image ({type(e).__name__}: {e}).")
                continue
            found = [InputItem(stem, f, "image", None, (h, w, 3))]
        elif ext in LATENT_EXTENSIONS:
            try:
                arr = _latent_array(f)
            except UpsampleError as e:
                problems.append(str(e))
                continue
            except Exception as e:  # noqa: BLE001
                problems.append(f"{f}: not a readable {ext} file ({type(e).__name__}: {e}).")
                continue
            batched = arr.ndim == 4
            arr, err = _to_nhwc(arr, latent_layout, channels, f)
            if err:
                problems.append(err)
                continue
            found = [InputItem(f"{stem}_{i}" if batched else stem, f, "latent", i, tuple(arr.shape[1:]))
                     for i in range(arr.shape[0])]
        else:
            problems.append(f"{f}: unsupported file type {ext!r}; give images {IMAGE_EXTENSIONS} or latents "
                            f"{LATENT_EXTENSIONS}.")
            continue
        for it in found:
            if it.name in names:
                problems.append(f"{f}: two inputs would both write {it.name}.png; rename one.")
            names.add(it.name)
        items += found
    if not items and not problems:
        problems.append(f"No images or latents found in {list(paths)}.")
    if stages is not None:
        try:
            check_inputs(items, stages, any_resolution=any_resolution)
        except UpsampleError as e:
            problems.append(str(e))
    if problems:
        raise UpsampleError("\n".join(problems))
    return items


def check_inputs(items: Sequence[InputItem], stages: Sequence[Stage], *, any_resolution: bool = False) -> None:
    """Sizes against the first stage of the cascade (raises :class:`UpsampleError`)."""
    first = stages[0]
    f = first.factor
    problems = []
    for it in items:
        h, w, _ = it.shape
        what = "image" if it.kind == "image" else "latent"
        if h != w:
            problems.append(f"{it.path}: the {what} is {w}x{h} (WxH); the upsampler needs square inputs "
                            "(crop or pad it first).")
            continue
        if it.kind == "image":
            if h % f:
                problems.append(f"{it.path}: side {h} is not divisible by {f}, the first stage's down-sampling "
                                f"factor; crop it to {h - h % f}² or resize it.")
                continue
            expected = first.config.data.lowres_size
        else:
            expected = first.in_latent
        if h != expected and not any_resolution:
            unit = "pixels" if it.kind == "image" else "latent cells"
            problems.append(f"{it.path}: {h}² {unit}, but {first.path} was trained on {expected}² inputs "
                            f"({first.describe()}); resize the input, choose a checkpoint for this resolution, "
                            "or pass --any_resolution.")
    if problems:
        raise UpsampleError("\n".join(problems))


def load_item(item: InputItem, *, latent_layout: str = "auto", channels: int = 4) -> np.ndarray:
    """Image float32 [h, w, 3] in [-1, 1], or latent float32 [h, w, C] as stored (NHWC)."""
    if item.kind == "image":
        loaded = load_image(item.path)
        if not loaded.ok:
            raise UpsampleError(f"{item.path}: {loaded.skip_reason} ({loaded.detail}).")
        return image_ops.to_unit_range(loaded.image)
    arr, err = _to_nhwc(np.asarray(_latent_array(item.path)), latent_layout, channels, item.path)
    if err:
        raise UpsampleError(err)
    return np.asarray(arr[item.index], np.float32)


# --------------------------------------------------------------------------- memory
@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Bytes of one compiled program: its temporaries, outputs and aliased buffers by XLA's
    ``memory_analysis()``, and its inputs other than the weights (which are in memory before it
    runs, like every stage's); ``kind``: encode, stage or decode."""
    kind: str
    stage: int | None  # index of the stage (kind "stage")
    what: str
    temp: int
    inputs: int
    outputs: int
    aliased: int = 0

    @property
    def need(self) -> int:
        """Bytes the program adds to what is in memory while it runs."""
        return self.temp + self.inputs + self.outputs - self.aliased


def _size(n: int) -> str:
    """Bytes for people: GiB from 1 GiB, else MiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _tree_bytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


def _host_available_bytes() -> tuple[int | None, str]:
    """Host memory a process may still take: ``MemAvailable`` of /proc/meminfo (else free
    pages), lowered to what a cgroup (container) limit leaves."""
    available, source = None, ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available, source = int(line.split()[1]) * 1024, "host MemAvailable"
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "host free pages"
        except (ValueError, OSError, AttributeError):
            return None, "host memory unknown"
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) - usage < available:
            available, source = int(limit) - usage, "the container's memory limit"
        break
    return available, source


def available_memory(device=None) -> tuple[int | None, str]:
    """``(bytes, where the number comes from)`` a new program may still allocate on ``device``
    (default: JAX's first device), ``(None, why)`` when that cannot be told.

    Accelerators: ``memory_stats()``'s ``bytes_limit`` minus ``bytes_in_use`` (weights already
    placed are in use). CPU: the host's available memory (:func:`_host_available_bytes`)."""
    device = device if device is not None else jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- backends without statistics raise various errors
        stats = None
    if stats and stats.get("bytes_limit"):
        limit, used = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
        return limit - used, f"{device.device_kind}: {_size(limit)} limit, {_size(used)} in use"
    if device.platform == "cpu":
        return _host_available_bytes()
    return None, f"{device.device_kind} reports no memory statistics"


# --------------------------------------------------------------------------- the pipeline
class CascadeRunner:
    """Jitted stages and decoder of a cascade (compiled once per input shape)."""
    def __init__(self, stages: Sequence[Stage], solver, *, decode_tile: int = -1, tile_overlap: int = AUTO_TILE_OVERLAP,
                 latents_scaled: bool = True):
        self.stages = list(stages)
        self.solver = solver
        self.first_stage = self.stages[0].upsampler.first_stage
        self.decode_tile = decode_tile
        self.tile_overlap = tile_overlap
        self.latents_scaled = latents_scaled
        self.params = [jax.device_put(s.params) for s in self.stages]
        self._jitted: dict = {}

    # sizes ------------------------------------------------------------------------------
    def entry_size(self, item: InputItem) -> int:
        """Latent cells of the first stage's input (image inputs of PSU checkpoints enter on
        the high-res grid)."""
        f = self.first_stage.downsample_factor
        side = item.shape[0]
        if item.kind == "image":
            side //= f
            if self.stages[0].upsampler.coupling.upsampling_mode == "psu":
                side = self.stage_out(0, side)
        return side

    def stage_out(self, s: int, size_in: int) -> int:
        st = self.stages[s]
        out = size_in * st.out_latent / st.in_latent
        if out != int(out):
            raise UpsampleError(f"{st.path}: a {size_in}² latent times the stage's factor {st.scale} is not an "
                                "integer size.")
        return int(out)

    def output_sizes(self, item: InputItem) -> list[int]:
        """Latent size after each stage."""
        side = item.shape[0] // (self.first_stage.downsample_factor if item.kind == "image" else 1)
        sizes = []
        for s in range(len(self.stages)):
            side = self.stage_out(s, side)
            sizes.append(side)
        return sizes

    def decoder(self, size: int):

        fs = self.first_stage
        if fs.name == "identity":
            return fs
        tile = self.decode_tile
        if tile < 0:
            tile = AUTO_TILE if size > AUTO_TILE_ABOVE else 0
        if tile and tile < size:
            overlap = min(self.tile_overlap, tile // 2)
            return dataclasses.replace(fs, tile_size=int(tile), tile_overlap=int(overlap))
        return dataclasses.replace(fs, tile_size=0)

    # jitted pieces ----------------------------------------------------------------------
    def _fn(self, name: str, build):
        if name not in self._jitted:
            self._jitted[name] = build()
        return self._jitted[name]

    def _encode_fn(self, kind: str, entry: int):
        """Jitted ``(first stage, batch) -> scaled latents`` of the first stage's input, or
        ``None`` (latents already scaled: taken as they are)."""

        if kind == "latent":
            if self.latents_scaled:
                return None
            return self._fn("scale_latent", lambda: jax.jit(scale_latents))
        f = self.first_stage.downsample_factor

        def enc(fs, x):
            if x.shape[1] != entry * f:
                x = image_ops.resize(x, (entry * f, entry * f), "bilinear")
            return fs.encode(x)
        return self._fn(f"image{entry}", lambda: jax.jit(enc))

    def _stage_fn(self, s: int, size: int):
        """Jitted ``(params, first stage, x, keys) -> (x, SampleResult without x)`` of stage ``s``."""

        ups = self.stages[s].upsampler
        solver = self.solver

        def sample(params, fs, x, keys):
            r = ups.sample(params, x, keys, size=size, solver=solver, first_stage=fs)
            return r.x, r._replace(x=None, intermediates=None, intermediate_ts=None)
        return self._fn(f"stage{s}-{size}", lambda: jax.jit(sample, compiler_options=compile_options.inference()))

    def _decode_fn(self, size: int):
        """``(jitted (decoder, z) -> uint8 images, decoder)`` of ``size``² latents."""
        dec = self.decoder(size)

        def decode(fs, z):
            return image_ops.to_uint8(jnp.clip(fs.decode(z), -1.0, 1.0))
        return self._fn(f"decode{size}-{getattr(dec, 'tile_size', 0)}", lambda: jax.jit(decode)), dec

    def encode(self, kind: str, batch: np.ndarray, entry: int):
        fn = self._encode_fn(kind, entry)
        if fn is None:
            return jax.numpy.asarray(batch)
        return fn(self.first_stage, batch)

    def run_stage(self, s: int, x, keys, size: int):
        return self._stage_fn(s, size)(self.params[s], self.first_stage, x, keys)

    def decode(self, x):
        fn, dec = self._decode_fn(x.shape[1])
        return fn(dec, x)

    # memory -----------------------------------------------------------------------------
    def memory_estimate(self, item: InputItem, batch_size: int) -> list[ProgramMemory]:
        """What each program of one batch of inputs like ``item`` needs, in run order: the
        programs are lowered and compiled with abstract inputs (the run reuses the compiled
        programs) and XLA's ``memory_analysis()`` is read. Nothing is computed."""
        fs = self.first_stage
        entry, sizes = self.entry_size(item), self.output_sizes(item)
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), batch_size))  # [B, 2] uint32
        steps = []  # (kind, stage, description, jitted function, arguments already in memory)
        enc = self._encode_fn(item.kind, entry)
        if enc is not None:
            steps.append(("encode", None, f"encoding {item.shape[0]}² inputs to {entry}² latents", enc, (fs,)))
        for s, size in enumerate(sizes):
            steps.append(("stage", s, f"stage {s + 1} ({self.stages[s].path}) up to {size}² latents",
                          self._stage_fn(s, size), (self.params[s], fs)))
        dec_fn, dec = self._decode_fn(sizes[-1])
        tile = getattr(dec, "tile_size", 0)
        steps.append(("decode", None, f"decoding {sizes[-1]}² latents" + (f" in {tile}² tiles" if tile else ""),
                      dec_fn, (dec,)))
        x = jax.ShapeDtypeStruct((batch_size, *item.shape), jnp.float32)  # the batch load_item makes
        out = []
        for kind, s, what, fn, resident in steps:
            new_inputs = (x, keys) if kind == "stage" else (x,)
            lowered = fn.lower(*resident, *new_inputs)
            stats = lowered.compile().memory_analysis()
            x = lowered.out_info[0] if kind == "stage" else lowered.out_info  # the next program's input
            if stats is not None:  # None: the backend does not tell
                # The inputs besides the weights: XLA's argument bytes leave out weights the
                # program does not use (pruned), so the weights cannot be subtracted from them.
                out.append(ProgramMemory(kind=kind, stage=s, what=what, temp=int(stats.temp_size_in_bytes),
                                         inputs=_tree_bytes(new_inputs), outputs=int(stats.output_size_in_bytes),
                                         aliased=int(stats.alias_size_in_bytes)))
        return out

    def check_memory(self, items: Sequence[InputItem], batch_size: int) -> None:
        """Raises :class:`UpsampleError` before any compute when a program of a batch of
        ``items`` (inputs of one shape) needs more memory than the device has free, saying
        what could fit instead."""
        available, source = available_memory()
        if available is None:
            return
        plan = self.memory_estimate(items[0], batch_size)
        worst = max(plan, key=lambda p: p.need, default=None)
        if worst is not None and worst.need > available:
            raise UpsampleError(self._memory_advice(items, batch_size, worst, available, source))

    def _memory_advice(self, items: Sequence[InputItem], batch_size: int, worst: ProgramMemory, available: int,
                       source: str) -> str:
        item = items[0]
        side, f = item.shape[0], self.first_stage.downsample_factor
        unit = "pixels" if item.kind == "image" else "latent cells"
        ratio = available / worst.need
        fits = []  # upper bounds: memory grows at least in proportion to the batch and the area
        if batch_size > 1:
            k = math.floor(batch_size * ratio)
            fits.append(f"--batch_size {k} or less" if k >= 1 else "not even --batch_size 1 at this input size")
        max_side = math.floor(side * math.sqrt(min(1.0, ratio * batch_size)))  # at batch size 1
        max_side -= max_side % f if item.kind == "image" else 0
        if max_side < side:
            fits.append(f"inputs of at most {max_side}² {unit} (now {side}²)" if max_side > 0
                        else "no input size: free memory first")
        autoencoder = self.first_stage.name != "identity"
        if worst.kind == "decode" and autoencoder:
            tile = getattr(self.decoder(self.output_sizes(item)[-1]), "tile_size", 0)
            fits.append(f"decoding in smaller tiles, --decode_tile {max(8, (tile or AUTO_TILE) // 2)} "
                        f"(now {f'{tile}²' if tile else 'untiled'})")
        psu = worst.kind == "stage" and "psu" in (self.stages[worst.stage].upsampler.coupling.upsampling_mode,
                                                  self.stages[worst.stage].upsampler.coupling.context_mode)
        if autoencoder and (worst.kind == "encode" or psu):
            config = os.path.join(self.stages[0].path, "config.json")
            does = "encoding" if worst.kind == "encode" else "the PSU up-sampling's decoding and encoding"
            fits.append(f"{does} in tiles: set first_stage.tile_size (latent cells, e.g. 64) in {config}")
        shown = ", ".join(it.path for it in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
        return (f"Not enough memory for {side}² {unit} inputs ({shown}) at --batch_size {batch_size}: {worst.what} "
                f"needs about {_size(worst.need)} ({_size(worst.temp)} temporaries and {_size(worst.outputs)} outputs "
                f"by XLA's memory analysis of the compiled program, {_size(worst.inputs)} inputs; the weights, "
                f"already in memory, not counted), but {_size(available)} "
                f"is free ({source}). Nothing was run. What could fit (upper bounds: memory grows at least in "
                f"proportion to the batch and to the input's area): {'; '.join(fits) or 'a device with more memory'}.")


def run(stages: Sequence[Stage], items: Sequence[InputItem], out_dir: str, *, solver, batch_size: int = 1,
        seed: int = 0, decode_tile: int = -1, latents_scaled: bool = True, latent_layout: str = "auto",
        save_latents: bool = False, progress: bool = True, check_memory: bool = True) -> dict:
    """Upsamples ``items`` through ``stages``; returns a summary (paths, NFE, seconds).

    ``check_memory``: first compile every program for every input shape and refuse (an
    :class:`UpsampleError` saying what could fit) if one needs more memory than the device has
    free (:meth:`CascadeRunner.check_memory`)."""

    if batch_size < 1:
        raise UpsampleError(f"--batch_size must be >= 1, got {batch_size}.")
    runner = CascadeRunner(stages, solver, decode_tile=decode_tile, latents_scaled=latents_scaled)
    channels = runner.first_stage.latent_channels
    for it in items:
        runner.output_sizes(it)  # integer sizes all the way (raises before compute)
    order = {it: i for i, it in enumerate(items)}
    groups: dict[tuple, list[InputItem]] = {}
    for it in items:
        groups.setdefault((it.kind, it.shape), []).append(it)
    if check_memory:  # every input shape, before any compute: a clear refusal, not RESOURCE_EXHAUSTED
        for group in groups.values():
            runner.check_memory(group, batch_size)
    os.makedirs(out_dir, exist_ok=True)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    root = jax.random.PRNGKey(seed)
    written, nfe, seconds = [], [0] * len(stages), {"cfm": 0.0, "decode": 0.0}
    bar = tqdm(total=len(items), desc="upsampling", unit="image", disable=not progress)
    for batch_items in batches:
        n = len(batch_items)
        arrays = [load_item(it, latent_layout=latent_layout, channels=channels) for it in batch_items]
        arrays += [arrays[-1]] * (batch_size - n)  # pad: one compiled shape per input shape
        x = runner.encode(batch_items[0].kind, np.stack(arrays), runner.entry_size(batch_items[0]))
        t0 = time.perf_counter()
        sizes = runner.output_sizes(batch_items[0])
        for s in range(len(stages)):
            idx = [order[it] for it in batch_items] + [order[batch_items[-1]]] * (batch_size - n)
            keys = sampling.example_keys(root, np.asarray(idx), stream=s)
            x, result = runner.run_stage(s, x, keys, sizes[s])
            sampling.raise_if_failed(result, what=f"Stage {stages[s].path}",
                                     remedy=f"Inputs {sorted({it.path for it in batch_items})}; try another --solver.")
            nfe[s] = int(np.max(np.asarray(result.nfe)))
        x.block_until_ready()
        t1 = time.perf_counter()
        images = np.asarray(runner.decode(x))
        seconds["cfm"] += t1 - t0
        seconds["decode"] += time.perf_counter() - t1
        latents = np.asarray(x) if save_latents else None
        for j, it in enumerate(batch_items):
            path = os.path.join(out_dir, f"{it.name}.png")
            Image.fromarray(images[j]).save(path)
            written.append(path)
            if save_latents:
                np.save(os.path.join(out_dir, f"{it.name}.npy"), latents[j])
        bar.update(n)
    bar.close()
    return {"outputs": written, "nfe_per_stage": nfe, "seconds": seconds, "solver": solver.as_dict(),
            "stages": [s.describe() for s in stages]}


# --------------------------------------------------------------------------- CLI
PROG = "python -m cfm_jax.upsample"
_REQUIRED = {"checkpoint": "the run directory", "input": "an image, latent file or folder",
             "out": "the output folder"}


def define_flags(fl: flags.FlagValues) -> None:
    """The command line's flags, on ``fl`` (a fresh ``FlagValues`` per :func:`main` call, so that
    main runs in-process as often as a test wants)."""
    def define(kind, name, default, help_, **kw):
        getattr(flags, f"DEFINE_{kind}")(name, default, help=help_, flag_values=fl, **kw)

    define("multi_string", "checkpoint", None,
           "Run directory (train.py or `convert fmboost`); repeat it for a cascade, lowest resolution "
           "first (required).")
    define("multi_string", "input", None, "Image or latent file, or folder (required).")
    define("string", "out", None, "Output folder for the PNGs (created if missing; required).")
    define("string", "solver", "euler:40",
           f"method[:grid points | :rtol], methods {ALL_METHODS}; default euler:40 (39 NFE, the paper's tables).")
    define("enum", "diffusion_form", sde.DEFAULT_DIFFUSION_FORM, "SDE solvers only.", enum_values=sde.DIFFUSION_FORMS)
    define("float", "diffusion_norm", sde.DEFAULT_DIFFUSION_NORM, "SDE solvers only.")
    define("enum", "last_step", sde.DEFAULT_LAST_STEP, "SDE solvers only.", enum_values=["Mean", "Euler", "none"])
    define("float", "last_step_size", sde.DEFAULT_LAST_STEP_SIZE, "SDE solvers only.")
    define("float", "atol", 1e-6, "Adaptive solvers only.")
    define("integer", "batch_size", 1, "Inputs per network call, >= 1.")
    define("integer", "seed", 0, "Seed of the sampling noise (see the module docstring).")
    define("bool", "online", False, "Use the online weights instead of the EMA.")
    define("integer", "step", None, "Checkpoint step, >= 0 (default: newest).")
    define("string", "first_stage", None, "Autoencoder path overriding the checkpoints' configs.")
    define("enum", "latent_layout", "auto", "Axis order of .npy/.npz latents; auto: the axis with the first stage's "
           "channel count.", enum_values=["auto", "nchw", "nhwc"])
    define("bool", "latents_scaled", True, "Input latents are already multiplied by the VAE's scale factor "
           "(diffusers' output_type='latent'); --nolatents_scaled for raw posterior samples.")
    define("bool", "any_resolution", False, "Allow inputs and cascades at sizes the checkpoints were not trained for.")
    define("integer", "decode_tile", -1, f"Latent cells per decoder tile; -1: {AUTO_TILE} above {AUTO_TILE_ABOVE}² "
           "latents, else untiled; 0: never tile.")
    define("bool", "save_latents", False, "Also write the final latents as .npy.")
    define("bool", "no_progress", False, "No progress bar.")


def parse(argv: Sequence[str]) -> flags.FlagValues:
    """The flags of ``argv`` (``argv[0]`` the program), checked as far as they can be without
    reading a file: a bad flag or value is one line and exit code 2."""
    fl = flags.FlagValues()
    define_flags(fl)
    rest = cli.parse_flags(fl, argv, prog=PROG, usage="--checkpoint DIR --input PATH --out DIR [flags]",
                           doc=__doc__.split("\n\n")[0],
                           epilog="See the module docstring (python -c 'import cfm_jax.upsample as u; "
                                  "print(u.__doc__)') for input formats and seeds.")
    cli.reject_positional(rest, PROG, "; give several inputs as --input a --input b")
    cli.require_flags(fl, _REQUIRED, PROG)
    cli.check_at_least(fl, (("batch_size", 1, "the number of inputs per network call"),
                            ("step", 0, "a checkpoint step")))
    return fl


def _check_options(args) -> None:
    """Option errors that need no file read (raises :class:`UpsampleError`)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UpsampleError(f"--out {args.out!r} is a file; --out names the folder the PNGs are written to "
                            "(created if missing): pass a folder path.")
    if args.decode_tile < -1:
        raise UpsampleError(f"--decode_tile={args.decode_tile}: use a tile size in latent cells, 0 (never tile) "
                            "or -1 (automatic).")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; ``argv[0]`` the program (default ``sys.argv``). Returns the exit code."""
    args = parse(sys.argv if argv is None else argv)
    cli.skip_tpu_probe_without_accelerator()  # before JAX makes a backend

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax metadata chatter

    checkpoints = list(args.checkpoint)
    try:
        _check_options(args)
        try:
            solver = SolverSpec.parse(args.solver, diffusion_form=args.diffusion_form,
                                      diffusion_norm=args.diffusion_norm,
                                      last_step=None if args.last_step == "none" else args.last_step,
                                      last_step_size=args.last_step_size, atol=args.atol)
        except ValueError as e:
            raise UpsampleError(f"--solver {args.solver}: {e}") from None
        stages = load_cascade(checkpoints, use_ema=not args.online, step=args.step, first_stage_path=args.first_stage,
                              any_resolution=args.any_resolution, read_weights=False)
        channels = stages[0].upsampler.first_stage.latent_channels
        items = scan_inputs(args.input, channels=channels, latent_layout=args.latent_layout, stages=stages,
                            any_resolution=args.any_resolution)
        read_stage_weights(stages, use_ema=not args.online, step=args.step)
        for st in stages:
            print(f"stage {st.describe()}")
        summary = run(stages, items, args.out, solver=solver, batch_size=args.batch_size, seed=args.seed,
                      decode_tile=args.decode_tile, latents_scaled=args.latents_scaled,
                      latent_layout=args.latent_layout, save_latents=args.save_latents,
                      progress=not args.no_progress)
    except UpsampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(summary["outputs"])
    print(f"{n} image(s) in {os.path.abspath(args.out)}; NFE per stage {summary['nfe_per_stage']}; "
          f"CFM {summary['seconds']['cfm']:.2f} s, decode {summary['seconds']['decode']:.2f} s (compile included).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
