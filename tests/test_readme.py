"""Every command in the README's ```bash blocks runs as written, as far as a CPU without the
data can take it (issue 29). Each command is checked by the rule of its kind, and a command no
rule knows fails the test (so a new README command gets a check):

- `make TARGET`: the target exists (`make -n`, which prints its recipe without running it);
- `accelerate launch [--config_file F ...] launch/train.py ARGS`: F exists; ARGS parse and load as
  a configuration (pg_train.config.load_config: every key, type and combination checked) — a run
  needs the GPUs, the checkpoint or the data the command names (`...` = the command above's
  arguments, dropped);
- `python -m MODULE ARGS` and the console scripts (`pg-train-*`): `MODULE --help` succeeds
  in-process (its arguments exist), and `pg_train.slurm submit` renders its job with `--dry-run`;
- `sbatch SCRIPT ...`: SCRIPT exists and is valid bash (`bash -n`).
The fast ones (`--help`, configuration, dry runs) are run; training itself is covered by
tests/test_cli.py (every shipped config, the default job) and tests/test_train.py.
"""

import re
import runpy
import shlex
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO

from pg_train.cli import DEFAULT_JOB, parse_args
from pg_train.config import load_config


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments and
    blank lines dropped, whitespace collapsed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"\s+#\s.*$", "", line).split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def run_module_help(module: str, *args: str, capsys) -> str:
    """`python -m MODULE ARGS` in this process (runpy, as -m does); its stdout. Exit 0 required."""
    argv, sys.argv = sys.argv, [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert exit.code in (0, None), f"python -m {module} {' '.join(args)} exited {exit.code}"
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def check_training_command(words: list[str]) -> None:
    launch = words.index("launch/train.py")
    if "--config_file" in words[:launch]:
        config_file = words[words.index("--config_file") + 1]
        assert (REPO / config_file).is_file(), config_file
    args = [w for w in words[launch + 1 :] if w != "..."]
    parsed = parse_args(args)
    overrides = list(parsed.overrides)
    for flag, key in ((parsed.output_dir, "output_dir"), (parsed.max_steps, "max_steps"), (parsed.resume, "resume")):
        if flag is not None and not (key == "resume" and flag == "auto"):
            overrides.append(f"{key}={flag}")
    for path in parsed.config:
        assert (REPO / path).is_file(), path
    load_config([REPO / p for p in parsed.config] or [DEFAULT_JOB], overrides)


COMMANDS = readme_commands()


def test_the_readme_has_commands_and_every_one_has_a_rule():
    assert len(COMMANDS) >= 10 and any(c.startswith("make train") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written_as_far_as_a_cpu_can(command, capsys):
    words = shlex.split(command.replace("$((N*8))", "16"))
    scripts = console_scripts()
    if words[0] == "make":
        proc = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    elif words[:2] == ["accelerate", "launch"] and "launch/train.py" in words:
        check_training_command(words)
    elif words[:2] == ["python", "-m"] and words[2] == "pg_train.slurm":
        out = run_module_help("pg_train.slurm", words[3], "--dry-run", *words[4:], capsys=capsys)
        assert "#SBATCH" in out and "--nodes=2" in out.replace(" ", "=")
    elif words[:2] == ["python", "-m"]:
        assert "usage" in run_module_help(words[2], "--help", capsys=capsys).lower()
    elif words[0] in scripts:
        module = scripts[words[0]].split(":")[0]
        assert "usage" in run_module_help(module, "--help", capsys=capsys).lower()
    elif words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
    else:
        pytest.fail(f"no rule checks this README command (add one to tests/test_readme.py): {command}")


def test_the_rules_catch_a_wrong_command():
    """What the checks above would say about a README mistake: a key grouped under `run` (the
    old configuration table's), a config file that is not there, a flag a module lacks."""
    from pg_train.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'run'"):
        check_training_command(["accelerate", "launch", "launch/train.py", "run.batch_size=4"])
    with pytest.raises(AssertionError, match="configs/nope.yaml"):
        check_training_command(["accelerate", "launch", "launch/train.py", "--config", "configs/nope.yaml"])
    with pytest.raises(AssertionError, match="exited 2"):
        run_module_help("pg_train.evaluate", "--no-such-flag", capsys=None)
