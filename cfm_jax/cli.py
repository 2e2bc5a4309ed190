"""What the command lines share (``train.py``, ``eval.py``, ``python -m cfm_jax.upsample``,
``.data.prepare``, ``.convert``, ``.plan``): one style, absl flags. Every option is a ``--flag``
(``--name value`` or ``--name=value``; a boolean ``--name`` / ``--noname``; an option taking
several values is repeated, ``--src a --src b``; there are no positional arguments, except
``convert``'s command). ``eval.py``, ``upsample``, ``prepare``, ``convert`` and ``plan`` define
their flags on a fresh ``FlagValues`` per ``main(argv)`` call (``argv[0]`` the program), so tests
run ``main`` in-process as often as they like, and parse them with :func:`parse_flags`
(``--help``: the usage, a description and the flags); ``train.py`` defines them on absl's global
``FLAGS`` (``app.run``). A user error is one line on stderr, ``error: <problem and fix>``, and
exit code 2 (:func:`fail`; :func:`require_flags`, :func:`check_at_least` and
:func:`reject_positional` for required flags, bounds and stray arguments; :func:`config_error`
for a ``--config`` file or override); an unexpected error keeps its traceback; and JAX does not
probe for a TPU on a machine that has none (:func:`skip_tpu_probe_without_accelerator`).
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Iterable, Mapping, NoReturn, Sequence

from absl import flags

EXIT_USAGE = 2  # absl's (and argparse's) code for a bad command line; ours for every user error


def fail(message: str) -> NoReturn:
    """Ends the command with ``error: message`` on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def parse_flags(fl, argv: Sequence[str], *, prog: str, usage: str = "[flags]", doc: str = "",
                epilog: str = "") -> list[str]:
    """Parses ``argv`` (``argv[0]`` the program) into the absl ``FlagValues`` ``fl``; returns
    ``argv[0]`` and the positional arguments. ``--help`` (``-h``, ``--helpshort``, ``--helpfull``) prints ``usage``,
    ``doc``, the flags and ``epilog`` and exits 0; a bad flag is one line and exit code 2 (absl's
    ``app.run`` prints two and exits 1)."""
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        parts = [f"usage: {prog} {usage}", doc.strip(), fl.get_help(include_special_flags=False).strip(),
                 epilog.strip()]
        print("\n\n".join(p for p in parts if p))
        raise SystemExit(0)
    try:
        return fl(list(argv))
    except flags.Error as e:
        fail(f"{e} (see {prog} --help)")


def reject_positional(rest: Sequence[str], prog: str, hint: str = "") -> None:
    """Fails on positional arguments (``rest`` as :func:`parse_flags` returns it, ``rest[0]`` the
    program): every option is a flag. ``hint`` (e.g. how to give several values) follows."""
    if len(rest) > 1:
        fail(f"unexpected arguments {list(rest[1:])}: every option is a --flag{hint} (see {prog} --help).")


def require_flags(fl, required: Mapping[str, str], prog: str) -> None:
    """Fails, naming every one that is missing, unless each flag of ``required`` (name -> what it
    is) has a value (absl's own required flags fail one at a time, without saying what they are)."""
    missing = [f"--{name} ({what})" for name, what in required.items() if fl[name].value in (None, "", [])]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        fail(f"{', '.join(missing)} {verb} required (see {prog} --help).")


def check_at_least(fl, checks: Iterable[tuple[str, int, str]], *, fix: str | None = None) -> None:
    """Integer flags that must be ``>= low``, each check ``(name, low, meaning)``: the first one
    below its bound fails with one line naming the flag, the value and the fix (``fix``, else: an
    integer ``>= low``, or the flag's default)."""
    for name, low, meaning in checks:
        value = fl[name].value
        if value is not None and value < low:
            default = fl[name].default
            hint = fix or f"pass an integer >= {low}" + ("" if default is None else f" or omit it (default {default})")
            fail(f"--{name}={value}: it is {meaning} and must be >= {low}; {hint}.")


def config_error(e: BaseException, argv: Sequence[str] = ()) -> str | None:
    """The one-line message of an ml_collections config error the user made (``train.py`` and
    ``plan`` take ``--config FILE`` with ``--config.section.key=value`` overrides): an override of a
    key the config lacks, named with the override of ``argv`` it came from and ml_collections'
    "did you mean", or a config file that does not load; ``None`` for any other error (a missing
    key no override names is a bug, which keeps its traceback)."""
    if isinstance(e, (KeyError, AttributeError)):
        key, hint = _missing_key(e)
        for arg in argv:
            path = arg.lstrip("-").split("=", 1)[0].split(".")
            if path[0] == "config" and key in path[1:]:
                where = ".".join(path[:path.index(key, 1)])
                return f"{key!r} not found in {where} ({arg}){'; ' + hint if hint else ''}"
        return None
    if isinstance(e, OSError) and ("Failed loading config file" in str(e) or "failure to load" in str(e)):
        text = one_line(e)  # ml_collections: "... Attempted [Relative path]: nope.py [Errno 2] No such file ..."
        return f"cannot load the config file: {text[text.rfind('[Errno'):] if '[Errno' in text else text}"
    return None


def _missing_key(e: BaseException) -> tuple[str | None, str]:
    """``(key, 'did you mean ...')`` of ml_collections' KeyError for an unknown config field."""
    key, hint = None, ""
    while e is not None:
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
            first, _, rest = e.args[0].partition("\n")
            key = first.strip("'\"")
            hint = hint or rest.strip().replace("Did you mean", "did you mean")
        e = e.__cause__ or e.__context__
    return key, hint


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line."""
    return " ".join(str(e).split())


# --------------------------------------------------------------------------- the TPU probe
# With libtpu installed (the tests install it for compile-only TPU plans) and JAX_PLATFORMS
# unset, JAX tries the TPU backend first even on a machine without one: libtpu prints "Failed to
# find host bounds ...", "INVALID_ARGUMENT: unexpected worker hostname ..." from C++ (no Python
# logger can silence that) and JAX logs "Unable to initialize backend 'tpu'", then falls back to
# the CPU. The only way to skip the probe is to name the platforms before the first backend is
# made. JAX_PLATFORMS=cpu is set only when that is what JAX would end up with anyway: no TPU
# device node or Google PCI device (what JAX's own TPU detection reads; a Google network card
# also counts, which only means the probe is kept), no GPU device node (JAX's hint that a CUDA
# jaxlib is missing stays) and no other PJRT plugin (CUDA, ROCm, ...) installed. A user's
# JAX_PLATFORMS (even empty) or JAX_FORCE_TPU_INIT is left alone.
_ACCELERATOR_DEVICE_GLOBS = ("dev/accel*", "dev/vfio/[0-9]*",  # TPU v2-v4 / v5e and later
                             "dev/nvidia[0-9]*", "dev/nvidiactl", "dev/dxg", "dev/kfd")  # NVIDIA, WSL, AMD
_GOOGLE_PCI_VENDOR = "0x1ae0"


def accelerator_hardware_present(root: str = "/") -> bool:
    """A TPU or GPU device node, or any Google PCI device, under ``root``."""
    if any(glob.glob(os.path.join(root, p)) for p in _ACCELERATOR_DEVICE_GLOBS):
        return True
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def accelerator_plugins() -> list[str]:
    """JAX PJRT plugins other than libtpu (the jax[cuda12] / jax[rocm] plugin packages)."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins  # here, not at the top: a namespace package that exists only with a plugin
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return names


def skip_tpu_probe_without_accelerator(root: str = "/") -> bool:
    """Sets ``JAX_PLATFORMS=cpu`` on a Linux machine with no accelerator and no accelerator plugin, unless
    the user chose platforms; returns whether it did. Call it before JAX makes its first backend."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or not sys.platform.startswith("linux"):
        return False
    if accelerator_hardware_present(root) or accelerator_plugins():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (it reads JAX_PLATFORMS at import): tell its config (no
        import jax            # effect once a backend exists, which on this machine is the CPU's anyway)

        jax.config.update("jax_platforms", "cpu")
    return True
