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


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_pods_run_ray_with_a_token_from_a_secret():
    """Every Ray pod has token auth on, the token from a Kubernetes Secret (required, not optional), and
    no usage stats; a dashboard on 0.0.0.0 is only allowed with that."""
    cluster = yaml.safe_load((PLATFORM / "kuberay" / "raycluster.yaml").read_text())
    containers = _containers(cluster)
    assert len(containers) >= 2
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"].get("value") == "token", container["name"]
        secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert secret["name"] and secret["key"] and not secret.get("optional"), container["name"]
        assert env["RAY_USAGE_STATS_ENABLED"].get("value") == "0"
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never the token itself in a manifest


def test_aws_cluster_keeps_the_dashboard_on_loopback_with_a_token():
    config = yaml.safe_load((PLATFORM / "aws-gpu.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head and "--dashboard-host=127.0.0.1" in head
    options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "RAY_USAGE_STATS_ENABLED=0" in options
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_platform_readme_says_how_a_cluster_gets_its_token_and_the_threat_model():
    text = (PLATFORM / "README.md").read_text()
    token = text[text.index("## Ray's token"):]
    assert "RAY_AUTH_TOKEN" in token and "kubectl create secret" in token and "ray get-auth-token" in token
    model = text[text.index("## Threat model"):]
    for word in ("**Trusted**", "**Not trusted**", "tally serve", "tally dashboard", "Network posture"):
        assert word in model
