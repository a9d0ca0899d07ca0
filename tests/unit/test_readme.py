"""Every command in README.md's ```bash blocks must exist as written: the entry point, each flag it
passes (checked against the program's own --help), and each config file with its overrides (loaded
with the real strict loader). A README command that drifts from the code fails here."""
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from gpt_vision.config_loader import load_config
from gpt_vision.run_configs import FinetuneConfig, PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LAUNCHER_FLAGS = {"torchrun": {"--nproc_per_node"}, "deepspeed": {"--num_gpus"},
                  "sbatch": {"-p", "-A", "-N", "--time"}}


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@lru_cache(maxsize=None)
def help_text(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} --help failed: {done.stderr[-500:]}"
    return done.stdout


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_flags(words: list[str], program: tuple[str, ...]) -> None:
    text = help_text(*program)
    for word in words:
        if word.startswith("-"):
            assert re.search(rf"(^|[\s\[,]){re.escape(word.split('=')[0])}\b", text), f"{word} not in {program} --help"


def check_config(words: list[str], root_cls) -> None:
    """`--config FILE key=value ...` loads with the real loader (overrides included)."""
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    load_config(root_cls, str(ROOT / config), overrides)


def strip_launcher(words: list[str]) -> list[str]:
    """Drop `torchrun/deepspeed/sbatch [their flags]` and return the script's own words."""
    launcher, rest = words[0], words[1:]
    allowed = LAUNCHER_FLAGS[launcher]
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0).split("=")[0]
        assert flag in allowed, f"{launcher} flag {flag} is not one the README may use"
        if rest and not rest[0].startswith("-") and not rest[0].endswith((".py", ".sh")):
            rest.pop(0)
    return rest


def check_python_script(words: list[str]) -> None:
    script = words[0]
    assert (ROOT / script).is_file(), script
    args = words[1:]
    if script == "launch/submit.py":
        check_flags(args[1:], (script,))
        if args[0] == "finetune":  # its slurm.* overrides are read by submit.py, not the task config
            args = [a for a in args if not a.startswith("slurm.")]
        sweeps = []
        while "--sweep" in args:  # KEY=V1,V2: the key must load with each value
            at = args.index("--sweep")
            sweeps.append(args[at + 1])
            args = args[:at] + args[at + 2:]
        for sweep in sweeps:
            key, values = sweep.split("=", 1)
            for value in values.split(","):
                check_config(args + [f"{key}={value}"], PretrainConfig if args[0] == "pretrain" else FinetuneConfig)
        check_config(args, PretrainConfig if args[0] == "pretrain" else FinetuneConfig)
        return
    check_flags(args, (script,))
    if script == "launch/pretrain.py":
        check_config(args, PretrainConfig)
    elif script == "launch/finetune.py":
        check_config(args, FinetuneConfig)
    elif script == "launch/sample.py":
        assert "--init" in args


def check_command(line: str) -> None:
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
        words = words[1:]
    tool = words[0]
    if tool == ".":  # activating the venv the README's other commands run in
        assert words[1:] == [".venv/bin/activate"] and (Path(sys.executable).parent / "activate").is_file()
    elif tool == "make":
        assert words[1] in make_targets(), f"make target {words[1]} missing"
    elif tool == "python" and words[1] == "-m":
        module, args = words[2], words[3:]
        if module == "data_shards":
            check_flags(args[1:], ("-m", "data_shards", args[0]))
        else:
            help_text("-m", module) if module != "gpt_vision.model" else subprocess.run(
                [sys.executable, "-m", module], cwd=ROOT, check=True, capture_output=True, timeout=120)
    elif tool == "python":
        check_python_script(words[1:])
    elif tool in ("torchrun", "deepspeed"):
        assert (Path(sys.executable).parent / tool).exists(), f"{tool} is not installed in the venv"
        check_python_script(strip_launcher(words))
    elif tool == "sbatch":
        script, *overrides = strip_launcher(words)
        assert (ROOT / script).is_file(), script
        load_config(PretrainConfig if "pretrain" in script else FinetuneConfig, str(ROOT / overrides[0]), overrides[1:])
    elif tool == "gpt-vision-export":
        assert "gpt-vision-export=gpt_vision.cli:export_main" in (ROOT / "setup.py").read_text()
        assert len(words) == 3
        help_text("-c", "from gpt_vision.cli import export_main; export_main()")
    elif tool == "tensorboard":
        assert (Path(sys.executable).parent / "tensorboard").exists()
        assert words[1] == "--logdir"
    else:
        pytest.fail(f"README command with no check: {line}")


COMMANDS = bash_commands()


def test_readme_has_the_two_setup_commands_first():
    assert COMMANDS[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_exists_as_written(line):
    check_command(line)


def test_readme_reports_measured_demo_results():
    text = README.read_text()
    assert "PLACEHOLDER" not in text
    assert re.search(r"val bits/dim", text) and re.search(r"\d+\.\d% top-1", text)
