"""Loading jobs/configs/*.yaml through the shared command line, with overrides and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from safetydpo import cli
from safetydpo.categories import CATEGORIES
from safetydpo.config import PROJECT_ROOT, Config, ConfigError, build_config, load_config

TOY = PROJECT_ROOT / "jobs" / "configs" / "toy.yaml"


def _load(*argv: str) -> Config:
    p = cli.parser("test")
    return cli.load(p, p.parse_args(["--config", str(TOY), *argv]))


def test_toy_config_spells_out_every_key() -> None:
    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in tree.items():
            out |= keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return out

    written, fields = keys(yaml.safe_load(TOY.read_text())), keys(Config().model_dump())
    assert not fields - written, f"add to {TOY.name}: {sorted(fields - written)}"
    assert not written - fields, f"unknown in {TOY.name}: {sorted(written - fields)}"


def test_toy_config_loads_with_run_root_under_the_project() -> None:
    config = _load()
    assert config.name == "toy"
    assert config.model.pretrained == "toy"
    assert config.data.selected_categories() == list(CATEGORIES)
    assert config.run_root == str(PROJECT_ROOT / "runs" / "toy")


def test_relative_paths_resolve_against_the_project_root_not_the_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _load("data.path=data/train.csv", "run_root=s3://bucket/run", "eval.prompts_path=/abs/p.csv")
    assert config.data.path == str(PROJECT_ROOT / "data" / "train.csv")
    assert config.run_root == "s3://bucket/run"
    assert config.eval.prompts_path == "/abs/p.csv"


def test_overrides_scalar_list_and_nested() -> None:
    config = _load("dpo.beta=2500", "data.categories=[hate, Harrasment]", "merge.methods=[average]",
                   "serve.num_replicas=auto", "tracking.experiment=exp")
    assert config.dpo.beta == 2500.0
    assert config.data.categories == ["Hate", "Harassment"]
    assert config.merge.methods == ["average"]
    assert config.serve.num_replicas == "auto"
    assert config.tracking.experiment == "exp"


def test_unknown_key_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dpo\.betta: unknown key"):
        load_config(TOY, ["dpo.betta=1"])
    with pytest.raises(ConfigError, match=r"nosuch: unknown key"):
        build_config({"nosuch": {"a": 1}})


def test_wrong_type_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dpo\.max_steps: .*'many'"):
        load_config(TOY, ["dpo.max_steps=many"])


@pytest.mark.parametrize("bad", ["dpo.beta", "=3", "dpo.beta=[1,", "dpo.beta.x=1"])
def test_bad_override_syntax_is_an_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="override|dpo.beta"):
        load_config(TOY, [bad])


def test_cli_exits_with_the_message(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load("generation.steps=3")
    assert exit_info.value.code == 2
    assert "generation.steps: unknown key" in capsys.readouterr().err


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_is_documented_once_in_the_readme_reference() -> None:
    from safetydpo import config_reference

    models = [Config, *(f.annotation for f in Config.model_fields.values() if isinstance(f.annotation, type)
                        and issubclass(f.annotation, BaseModel))]
    undocumented = [f"{m.__name__}.{k}" for m in models for k, f in m.model_fields.items() if not f.description]
    assert undocumented == []
    readme = config_reference.README.read_text()
    assert config_reference.readme_section(readme) == config_reference.reference(), \
        "README's config reference is stale: python -m safetydpo.config_reference --update"


def test_a_preset_extends_a_config_and_holds_only_what_it_changes(tmp_path: Path) -> None:
    (tmp_path / "presets").mkdir()
    preset = tmp_path / "presets" / "paper.yaml"
    preset.write_text(f"extends: {TOY.resolve()}\nname: paper\ndpo:\n  anchor_weight: 0.0\n"
                      "  lora_targets: [to_k]\n")
    toy, paper = load_config(TOY), load_config(preset, ["dpo.beta=50"])
    assert paper.name == "paper" and paper.dpo.anchor_weight == 0.0 and paper.dpo.beta == 50.0
    assert paper.dpo.lora_targets == ["to_k"]  # a list replaces, it does not extend
    # every other key, in the changed section too, is the extended config's
    assert paper.dpo.preserve_weight == toy.dpo.preserve_weight and paper.data == toy.data
    relative = tmp_path / "presets" / "relative.yaml"
    relative.write_text("extends: paper.yaml\nrun_root: runs/relative\n")
    assert load_config(relative).dpo.anchor_weight == 0.0


def test_a_preset_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "a.yaml")


def test_the_paper_preset_is_the_toy_config_with_the_paper_objective_only() -> None:
    toy = load_config(PROJECT_ROOT / "jobs" / "configs" / "toy.yaml")
    paper = load_config(PROJECT_ROOT / "jobs" / "configs" / "toy_paper.yaml")
    assert (paper.dpo.anchor_weight, paper.dpo.preserve_weight, paper.dpo.sft_weight) == (0.0, 0.0, 0.0)
    assert (paper.dpo.beta, paper.dpo.caption_dropout) == (500.0, 0.2)
    assert paper.run_root != toy.run_root
    assert paper.dpo.model_copy(update=toy.dpo.model_dump(include={
        "beta", "anchor_weight", "preserve_weight", "sft_weight", "caption_dropout"})) == toy.dpo
    assert paper.experts == toy.experts and paper.merge == toy.merge and paper.eval == toy.eval
