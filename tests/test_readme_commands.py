"""Every command line in the code blocks of the README and of ``docs/*.md`` parses with the real parser of its program:
train.py, eval.py, ``python -m cfm_jax.{upsample,data.prepare,convert,plan}`` and launch_tpu.sh
(with the train.py flags after its ``--``). Only the command lines are parsed (flags, values,
``--config.section.key`` overrides against the config file); nothing runs. A renamed or
misspelt flag, in the documentation or in a program, fails here."""
import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
PYTHONS = {".venv/bin/python", "python", "python3"}


# --------------------------------------------------------------------------- extraction
def command_lines(markdown: str) -> list[tuple[list[str], str]]:
    """``(tokens, comment)`` of each command line in the fenced code blocks: ``\\`` continuations
    joined, ``$NAME`` placeholders replaced by ``1`` (the README uses them for counts and
    indices), the trailing ``# comment`` split off."""
    lines, in_block = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            lines.append(line)
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for line in joined:
        code, comment = _split_comment(line)
        tokens = shlex.split(re.sub(r"\$\{?[A-Za-z_]+\}?", "1", code))
        if tokens:
            out.append((tokens, comment))
    return out


def _split_comment(line: str) -> tuple[str, str]:
    """``(code, '# comment')``: a ``#`` starting a word outside quotes starts a shell comment."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:].strip()
    return line, ""


def program_of(tokens: list[str]) -> tuple[str | None, list[str]]:
    """The program a command line runs (``train.py``, ``cfm_jax.upsample``, ``launch_tpu.sh``,
    ...) and its arguments; ``None`` for other commands (make, bash, bench scripts)."""
    if tokens[0] == "./launch_tpu.sh":
        return "launch_tpu.sh", tokens[1:]
    if tokens[0] not in PYTHONS or len(tokens) < 2:
        return None, []
    if tokens[1] == "-m" and len(tokens) > 2:
        return tokens[2], tokens[3:]
    return (tokens[1], tokens[2:]) if tokens[1] in ("train.py", "eval.py") else (None, [])


# --------------------------------------------------------------------------- the real parsers
@contextlib.contextmanager
def _captured():
    """Collects stderr and stdout; a parser's exit becomes a problem string, not a test exit."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def _run_parser(parse) -> str | None:
    """None when ``parse()`` accepts the arguments, else what it said."""
    with _captured() as err:
        try:
            parse()
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip() or f"exit code {e.code}"
        except Exception as e:  # noqa: BLE001 -- absl / ml_collections raise many types for a bad flag
            return f"{type(e).__name__}: {e}"
    return None


def _train_module(argv: list[str]) -> tuple[dict, object]:
    """train.py's namespace and its flags in a fresh ``FlagValues``: its module code is run with
    ``absl.flags`` and ``ml_collections.config_flags`` whose ``FLAGS`` is that ``FlagValues`` and
    whose ``DEFINE_*`` write there (train.py defines its flags at import, on absl's global FLAGS,
    where eval.py's ``--workdir`` would collide), overrides looked for in ``argv``."""
    import absl
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    fl = flags.FlagValues()

    def bound(define, **extra):
        return lambda *a, **k: define(*a, **{"flag_values": fl, **extra, **k})
    shim_flags = type(sys)("flags_for_readme_check")
    shim_flags.__dict__.update({n: getattr(flags, n) for n in dir(flags) if not n.startswith("__")})
    shim_flags.__dict__.update({n: bound(getattr(flags, n)) for n in dir(flags) if n.startswith("DEFINE")})
    shim_flags.FLAGS = fl
    shim_config = type(sys)("config_flags_for_readme_check")
    shim_config.__dict__.update({n: getattr(config_flags, n) for n in dir(config_flags) if not n.startswith("__")})
    shim_config.DEFINE_config_file = bound(config_flags.DEFINE_config_file, sys_argv=argv)
    path = os.path.join(ROOT, "train.py")
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    saved = absl.flags, ml_collections.config_flags
    absl.flags, ml_collections.config_flags = shim_flags, shim_config
    try:
        namespace = {"__name__": "train_flags_for_readme_check", "__file__": path}
        exec(code, namespace)  # noqa: S102 -- the repository's own train.py, not run: __name__ != "__main__"
    finally:
        absl.flags, ml_collections.config_flags = saved
    assert "workdir" in fl and "config" in fl, "train.py's flags were not found; update this test"
    return namespace, fl


def _parse_train(args: list[str]) -> None:
    argv = ["train.py", *args]
    namespace, fl = _train_module(argv)
    if "_parse_flags" in namespace:  # train.py's own parsing (its default config, one-line errors)
        namespace["_parse_flags"](argv)
    else:
        fl(argv)
    fl.config.model  # noqa: B018 -- loads the config file and applies the --config.* overrides


def _parse_plan(args: list[str]) -> None:
    """``cfm_jax.plan.main`` up to the point where it would compile: flags, config, overrides."""
    import jax

    from cfm_jax import plan

    class Parsed(Exception):
        pass

    def stop(*a, **k):
        raise Parsed
    argv = ["plan", *args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "plan", stop)
        mp.setattr(sys, "argv", argv)  # plan's config overrides are looked for in sys.argv
        mp.setattr(jax.config, "update", lambda *a, **k: None)  # it turns the compilation cache off
        try:
            code = plan.main(argv)
        except Parsed:
            return
    raise SystemExit(code)


def _launch_tpu_options() -> tuple[set[str], str]:
    """The options launch_tpu.sh's argument loop accepts, and its default --config."""
    with open(os.path.join(ROOT, "launch_tpu.sh")) as f:
        script = f.read()
    loop = script[script.index("while (($#)); do"):]
    loop = loop[:loop.index("\ndone")]
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)(?==\*|\)|\s*\|)", loop))
    default_config = re.search(r'\bCONFIG="([^"]+)"', script).group(1)
    assert {"--name", "--zone", "--dry-run", "--delete"} <= options, options
    return options, default_config


def _parse_launch(args: list[str]) -> None:
    options, config = _launch_tpu_options()
    ours, train_args = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    unknown = [a.split("=")[0] for a in ours if a.startswith("--") and a.split("=")[0] not in options]
    if unknown:
        print(f"launch_tpu.sh: unknown options {unknown}", file=sys.stderr)
        raise SystemExit(2)
    if "--config" in ours:
        config = ours[ours.index("--config") + 1]
    _parse_train(["--config", config, *train_args])  # launch_tpu.sh passes its --config on to train.py


def check(program: str, args: list[str]) -> str | None:
    """None if ``program`` accepts ``args``, else the parser's complaint."""
    if program == "train.py":
        parse = lambda: _parse_train(args)  # noqa: E731
    elif program == "eval.py":
        parse = lambda: importlib.import_module("eval").parse(["eval.py", *args])  # noqa: E731
    elif program in ("cfm_jax.upsample", "cfm_jax.data.prepare"):
        parse = lambda: importlib.import_module(program).parse([program, *args])  # noqa: E731
    elif program == "cfm_jax.convert":
        parse = lambda: _convert_cli().parse(["convert", *args])  # noqa: E731
    elif program == "cfm_jax.plan":
        parse = lambda: _parse_plan(args)  # noqa: E731
    elif program == "launch_tpu.sh":
        parse = lambda: _parse_launch(args)  # noqa: E731
    else:
        return f"no parser known for {program}: add it to tests/test_readme_commands.py"
    return _run_parser(parse)


def _convert_cli():
    """``cfm_jax/convert/__main__.py`` (loaded from its file: the package's converters are not needed)."""
    spec = importlib.util.spec_from_file_location("convert_cli_for_readme_check",
                                                  os.path.join(ROOT, "cfm_jax", "convert", "__main__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_problems(markdown: str) -> tuple[list[str], dict[str, int]]:
    """Problems of the README's command lines, and how many lines of each program were checked.
    A line whose comment says ``error`` documents a failure: it must fail."""
    problems, counts = [], {}
    for tokens, comment in command_lines(markdown):
        program, args = program_of(tokens)
        if program is None:
            continue
        counts[program] = counts.get(program, 0) + 1
        problem = check(program, args)
        expect_failure = "error" in comment
        if expect_failure and problem is None:
            problems.append(f"{' '.join(tokens)}: documented to fail ({comment}), but its parser accepts it")
        elif problem is not None and not expect_failure:
            problems.append(f"{' '.join(tokens)}\n    -> {problem}")
    return problems, counts


# --------------------------------------------------------------------------- tests
@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config files are named relative to the repository, as in the README


def test_every_documented_command_line_parses(in_root):
    problems, counts = [], {}
    for path in DOCS:
        p, c = readme_problems(_read(path))
        problems += [f"{os.path.relpath(path, ROOT)}: {x}" for x in p]
        counts = {k: counts.get(k, 0) + c.get(k, 0) for k in {*counts, *c}}
    assert len(DOCS) >= 8, DOCS  # the README and the docs pages were found
    assert not problems, "documented command lines their programs reject:\n" + "\n".join(problems)
    for program in ("train.py", "eval.py", "cfm_jax.upsample", "cfm_jax.data.prepare", "cfm_jax.convert",
                    "cfm_jax.plan", "launch_tpu.sh"):
        assert counts.get(program, 0) >= 1, (program, counts)  # the extraction found them


@pytest.mark.parametrize("old, new", [
    ("--solver euler:41 --batch_size 4", "--solvers euler:41 --batch_size 4"),  # upsample
    ("--num_images 1000", "--num_imagess 1000"),  # eval.py
    ("--num_images 5000", "--num_images -5"),  # eval.py: a value check, not just the name
    ("--config.optim.lr=3e-4", "--config.optim.lrate=3e-4"),  # train.py: an override of no key
    ("--lowres_size 512 --first_stage_path checkpoints/sd_ae_flax \\",
     "--lowres 512 --first_stage_path checkpoints/sd_ae_flax \\"),  # prepare (an abbreviation)
    ("--crops_per_image 1 --batch_size 8", "--crops_per_image 0 --batch_size 8"),  # prepare: a value check
    ("convert fmboost --src", "convert fmbost --src"),  # convert: the command
    ("--topology v4-32 --search 4", "--topologies v4-32 --search 4"),  # plan
    ("--config.data.image_size=2048 --config.data.lowres_size=1024   # the",
     "--config.data.imagesize=2048 --config.data.lowres_size=1024   # the"),  # plan: an override of no key
    ("--bucket my-bucket/cfm --dry-run", "--bucket my-bucket/cfm --dryrun"),  # launch_tpu.sh
    ("--config.data.path=/data/cfm_latents_1024", "--config.data.pth=/data/cfm_latents_1024"),  # launch -> train
    ("--config.optim.lrr=1   # error", "--config.optim.lr=1   # error"),  # a documented failure that passes
])
def test_the_check_fails_on_a_renamed_flag(old, new, in_root):
    holders = [p for p in DOCS if old in _read(p)]
    assert len(holders) == 1 and _read(holders[0]).count(old) == 1, (old, holders)  # one line, one page
    problems, _ = readme_problems(_read(holders[0]).replace(old, new))
    changed = next(t for t in new.split() if t not in old.split())
    assert len(problems) == 1 and changed in problems[0], problems  # that line, and only that one


def test_command_lines_join_continuations_and_split_comments():
    text = "```bash\n.venv/bin/python eval.py --workdir 'a b' \\\n    --num_images $N   # note\nmake test\n```\n"
    assert command_lines(text) == [([".venv/bin/python", "eval.py", "--workdir", "a b", "--num_images", "1"],
                                    "# note"), (["make", "test"], "")]
