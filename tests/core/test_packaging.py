"""The package's own metadata: what CI, ComfyUI-Manager and users rely on stays consistent."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_is_pyproject_dependencies_minus_torch():
    deps = [d for d in _pyproject()["project"]["dependencies"] if not d.startswith("torch")]
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert reqs == deps


def test_no_dependency_pulls_torchvision_or_pins_torch_above_the_cpu_wheel():
    project = _pyproject()["project"]
    every = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = [re.split(r"[<>=~!; \[]", d)[0].lower() for d in every]
    assert not {"torchvision", "torchaudio", "spandrel"} & set(names)
    torch_spec = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert "<" not in torch_spec and "==" not in torch_spec


def test_every_package_folder_is_listed_for_setuptools():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=ROOT, capture_output=True, text=True).stdout
    found = {"latent_rewards"}
    for init in tracked.split():
        parts = Path(init).parent.parts
        if parts and parts[0] not in {"tests", "bench"}:
            found.add("latent_rewards." + ".".join(parts))
    assert found == listed


def test_quick_start_has_the_three_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    for tag in ("set-up", "main job", "test"):
        assert re.search(rf"^[^#\n].*# {tag}([ :]|$)", readme, flags=re.M), f"README Quick start lacks '# {tag}'"
    assert 'pip install -e ".[dev]"' in readme and "latent-rewards demo" in readme


def test_cli_help_lists_every_command():
    from latent_rewards.trainer.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "latent_rewards.trainer.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for name in COMMANDS:
        cmd = name.replace("_", "-")
        assert cmd in out.stdout


@pytest.mark.parametrize("command", ["demo", "encode", "fit-manifold", "score", "evaluate", "generate", "train",
                                     "push", "convert"])
def test_each_command_explains_itself(command):
    from latent_rewards.trainer.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    help_text = sub.choices[command].format_help()
    assert len(help_text) > 200 and "usage: latent-rewards " + command in help_text


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, with relative imports resolved against the package layout."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["latent_rewards", *path.relative_to(ROOT).parent.parts]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("rewards", ("diffusers", "comfy", "comfy_api", "folder_paths", "accelerate", "gradio", "peft",
                     "latent_rewards.pipelines", "latent_rewards.nodes", "latent_rewards.trainer")),
        ("pipelines", ("comfy", "comfy_api", "folder_paths", "latent_rewards.nodes", "latent_rewards.trainer")),
        ("trainer", ("comfy", "comfy_api", "folder_paths", "latent_rewards.nodes")),
        ("nodes", ("latent_rewards.trainer",)),
    ],
)
def test_dependencies_point_down_only(layer, forbidden):
    """ARCHITECTURE: rewards/ is the pure core; pipelines/ and nodes/ adapt it; trainer/ never imports nodes/."""
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad
