"""platform/ is configuration only: its YAML parses, it never becomes a Python package (`platform` is a
stdlib module), and every `tally <command>` the docs tell people to run exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
# `tally <word>` in commands; not `tally-platform`, `tally.cli`, `$TALLY_DATA`, or `from tally import x`.
COMMAND_RE = re.compile(r"(?<![\w.$-])(?<!from )(?<!import )tally[ \t]+([a-z][\w-]*)")
FENCE_RE = re.compile(r"```.*?```", re.S)
SPAN_RE = re.compile(r"`([^`\n]+)`")


def known_subcommands() -> set[str]:
    """The subcommands of the real parser: a parser that fails to build fails the test."""
    from tally.cli import build_parser

    actions = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert actions, "tally.cli.build_parser has no subcommands"
    return set(actions[0].choices)


def _code_text(path: Path) -> str:
    """Markdown: only code blocks and spans (prose may say "tally" as a word); other files: everything."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    blocks = FENCE_RE.findall(text)
    spans = SPAN_RE.findall(FENCE_RE.sub("", text))
    return "\n".join(blocks + spans)


def _documented_files() -> list[Path]:
    files = [p for p in PLATFORM.rglob("*") if p.is_file()]
    files += list(ROOT.glob("README*.md"))
    return sorted(set(files))


def test_platform_yaml_parses():
    files = sorted(PLATFORM.rglob("*.yaml")) + sorted(PLATFORM.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_platform_is_not_a_python_package():
    assert not (PLATFORM / "__init__.py").exists()
    assert not list(PLATFORM.rglob("*.py"))
    import platform  # the standard library's, not ours

    assert hasattr(platform, "python_version")


def test_documented_tally_commands_exist():
    known = known_subcommands()
    seen = set()
    for path in _documented_files():
        for cmd in COMMAND_RE.findall(_code_text(path)):
            assert cmd in known, f"{path.relative_to(ROOT)}: `tally {cmd}` is not a tally subcommand"
            seen.add(cmd)
    assert {"search", "dashboard", "export"} <= seen  # the how-to covers the main steps


def test_command_pattern():
    text = "pip install tally-platform; from tally import x; $TALLY_DATA; tally.cli; /bin/tally search s.yaml"
    assert COMMAND_RE.findall(text) == ["search"]


def test_cluster_configs_match_the_runtime():
    aws = yaml.safe_load((PLATFORM / "aws-gpu.yaml").read_text())
    head = " ".join(aws["head_start_ray_commands"])
    assert "ray start --head" in head and """--resources='{"TRAIN_DRIVER": 8}'""" in head
    cluster = yaml.safe_load((PLATFORM / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and "TRAIN_DRIVER" in cluster["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    job = yaml.safe_load((PLATFORM / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"] == "tally search searches/pacs-sub.yaml --address auto --storage /mnt/results"
    assert (ROOT / "searches" / "pacs-sub.yaml").exists()
    docker = (PLATFORM / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", docker, re.M) and not re.search(r"^ENTRYPOINT", docker, re.M)


def test_readme_covers_the_cluster_lifecycle():
    text = (PLATFORM / "README.md").read_text()
    for needle in ("ray up platform/aws-gpu.yaml", "ray job submit", "--working-dir .", "--storage /shared/results",
                   "tally dashboard /shared/results", "ssh -L", "tally export", "ray down"):
        assert needle in text, needle
