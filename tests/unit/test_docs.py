"""The documentation as a user meets it: the README is short and opens with the two commands CI
runs, every relative link resolves, the configuration page names every key of the schema, and
every benchmark report carries its date, machine, command and result file. Text scans, seconds."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
REPORT_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md$")


def _doc_files():
    yield ROOT / "README.md"
    yield from (p for p in (ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md") if p.exists())
    for folder in ("docs", "benchmarks", "deepspeed_configs", "launchers"):
        yield from sorted((ROOT / folder).rglob("*.md"))


def test_readme_is_a_front_door_that_opens_with_the_commands_ci_runs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300): move detail into docs/"
    commands = [line.strip() for line in lines[:12] if line.startswith("    ")]
    assert len(commands) == 2, f"the README's first lines must hold the two set-up commands, found {commands}"
    main_job, tests = commands
    assert "deepspeed_configs/quickstart_cpu.json" in main_job and "train.py" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = tests.split("&&")[-1].strip()
    assert test_command.endswith(" tests"), f"the README's test command must run all of tests/: {test_command!r}"
    # CI runs that command as its two tiers, which together are the whole suite
    for tier in ("unit", "integration"):
        assert f"{test_command}/{tier} " in ci, f".ci/run does not run {test_command}/{tier}"
    # (tests/unit/test_suite_layout.py: every test file is in one of the two)
    install = tests.split("&&")[2].strip()
    assert install.replace("pip install", "pip install -q") in ci, (
        f".ci/run does not install as the README: {install!r}"
    )


def _target(doc: Path, link: str) -> Path | None:
    if re.match(r"^[a-z]+:", link) or link.startswith("mailto"):
        return None
    return (doc.parent / link).resolve()


def test_every_relative_link_resolves():
    missing = []
    for doc in _doc_files():
        for link in LINK.findall(doc.read_text()):
            target = _target(doc, link)
            if target is None or target.exists():
                continue
            # a docs page being written: its content waits in docs/staging/<page> until it is merged
            staged = ROOT / "docs" / "staging" / target.name
            if target.parent == ROOT / "docs" and staged.exists():
                continue
            missing.append(f"{doc.relative_to(ROOT)}: {link}")
    assert not missing, missing


def _schema_keys():
    from jigsaw_ext.mesh import MeshConfig
    from weathermixer.config import ChannelsConfig, ModelConfig
    from weathermixer.config import train as train_config

    models = [
        MeshConfig,
        ModelConfig,
        ChannelsConfig,
        train_config.TrainConfig,
        train_config.ParamGroupRule,
        train_config.LossConfig,
        train_config.ValidationConfig,
        train_config.CheckpointConfig,
        train_config.LogConfig,
        train_config.SyntheticDataConfig,
        train_config.DataConfig,
    ]
    sections = [f for f in train_config.TrainJobConfig.model_fields]
    return sections + [name for model in models for name in model.model_fields], models


def test_configuration_page_names_every_key_of_the_schema():
    text = (ROOT / "docs" / "configuration.md").read_text()
    keys, models = _schema_keys()
    assert all(issubclass(m, BaseModel) for m in models)
    missing = sorted({k for k in keys if f"`{k}`" not in text})
    assert not missing, f"docs/configuration.md does not name these job-file keys: {missing}"


@pytest.mark.parametrize("report", sorted((ROOT / "benchmarks" / "reports").glob("*")), ids=lambda p: p.name)
def test_benchmark_reports_are_dated_and_say_how_they_were_measured(report):
    assert REPORT_NAME.match(report.name), f"{report.name}: name reports YYYY-MM-DD-<topic>.md"
    head = report.read_text()[:1500]
    for field in ("**Date**", "**Machine**", "**Command**", "**Result file**"):
        assert field in head, f"{report.name} lacks {field}"
    assert f"**Date**: {report.name[:10]}" in head, f"{report.name}: the date in the name and the text differ"


def test_benchmarks_readme_indexes_every_report():
    index = (ROOT / "benchmarks" / "README.md").read_text()
    reports = sorted((ROOT / "benchmarks" / "reports").glob("*.md"))
    missing = [p.name for p in reports if f"(reports/{p.name})" not in index]
    assert not missing, f"benchmarks/README.md's table of reports lacks: {missing}"
