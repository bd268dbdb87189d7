"""The config commands: `limpq config validate` (every check `limpq run` makes first) and the
configuration reference generated from the schema, which the README must carry up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config.reference import (
    END_MARKER,
    START_MARKER,
    current_reference,
    render_reference,
    update_markdown,
)
from orchestrator.config.schema import PipelineConfig
from orchestrator.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_config_validate_prints_ok_or_the_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("data: {demo: true}\nsearch: {budgets: [{target_wbits: 4, target_abits: 4}]}\n")
    bad.write_text("data: {demo: true}\nray: {num_workers: 0}\n")
    assert main(["config", "validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"limpq: error: {bad}: ray.num_workers: Input should be greater than or equal to 1\n"


@pytest.mark.parametrize("section", ["ray: {compile: \"on\"}", "ray: {num_workers: 2, bf16: true}"])
def test_a_moved_key_is_refused_with_its_new_name(section: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(f"data: {{demo: true}}\n{section}\n")
    assert main(["config", "validate", str(config)]) == 2
    key = "compile" if "compile" in section else "bf16"
    assert capsys.readouterr().err == (f"limpq: error: {config}: ray.{key}: moved to training.{key}; "
                                       f"set training.{key} instead\n")


def test_readme_configuration_reference_is_up_to_date() -> None:
    assert current_reference(REPO / "README.md") == render_reference(), (
        "README.md's configuration reference differs from the schema; run: limpq config reference --update README.md"
    )


def test_reference_documents_every_key_with_its_default() -> None:
    reference = render_reference()
    for key in PipelineConfig.model_construct().flat():
        assert f"| `{key}` |" in reference, key
    assert "| `ray.num_workers` | int (>= 1) | `1` |" in reference
    assert "| `search.budgets[].target_wbits` | int or null (>= 2, <= 8) | `null` |" in reference


def test_reference_update_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START_MARKER}\nstale\n{END_MARKER}\n\n## After\n")
    assert update_markdown(readme) is True
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{END_MARKER}\n\n## After\n")
    assert "stale" not in text and current_reference(readme) == render_reference()
    assert update_markdown(readme) is False
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="markers"):
        update_markdown(readme)
