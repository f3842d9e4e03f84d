"""Commands generated from config dataclasses (`lorakit.cli.options.config_command`): every kind of field
becomes the option it declares, and a `--config` YAML file, flags and `from_options` build equal configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from lorakit.cli.options import config_command
from lorakit.merge.config import MergeConfig
from lorakit.options import OptionError, Options, argument, option, positive_ints
from lorakit.train.config import TrainConfig


@dataclass
class Example(Options):
    path: str = argument(help="A positional argument.")
    out: str = option(help="A required option with a short form.", flags=("--out", "-o"))
    weights: list[float] | None = option(None, help="Numbers, comma-separated or repeated.")
    names: list[str] | None = option(None, help="Values kept whole (paths).", commas=False)
    pattern: dict[str, int] | None = option(None, help="NAME=VALUE entries.")
    kind: Literal["a", "b"] = option("a", help="One of two choices.")
    as_json: bool = option(False, help="A switch whose flag is not its field's name.", flags=("--json",))
    steps: int = option(1, help="A positive integer.")

    def validate(self) -> None:
        positive_ints(self, ("steps",))


def invoke(cls: type, args: list[str]) -> tuple[list, object]:
    """Run the command generated for `cls` with `args`: (the configs it was given, Click's result)."""
    seen: list = []

    def run(config) -> None:
        """Record the config."""
        seen.append(config)

    app = typer.Typer()
    app.command()(config_command(cls, run))
    return seen, CliRunner().invoke(app, args)


@pytest.mark.parametrize(("args", "expected"), [
    ([], {}),
    (["--out", "x", "--weights", "0.5,0.25", "--weights", "1"], {"weights": [0.5, 0.25, 1.0]}),
    (["--names", "a,b", "--names", "c"], {"names": ["a,b", "c"]}),
    (["--pattern", "q=2,k=3"], {"pattern": {"q": 2, "k": 3}}),
    (["--kind", "b", "--json", "--steps", "3"], {"kind": "b", "as_json": True, "steps": 3}),
])
def test_flags_build_the_config(args: list[str], expected: dict) -> None:
    seen, result = invoke(Example, ["p", "-o", "x", *args])
    assert result.exit_code == 0, result.output
    assert seen == [Example(path="p", out="x", **expected)]


@pytest.mark.parametrize(("args", "expected"), [
    (["p"], "Missing option '--out'"),
    (["-o", "x"], "Missing argument"),
    (["p", "-o", "x", "--kind", "c"], "Invalid value for '--kind'"),
    (["p", "-o", "x", "--weights", "0.5,half"], "expected numbers, comma-separated (e.g. 0.7,0.3), got"),
    (["p", "-o", "x", "--pattern", "q"], "expected NAME=VALUE"),
    (["p", "-o", "x", "--no-json"], "No such option"),
])
def test_usage_errors(args: list[str], expected: str) -> None:
    seen, result = invoke(Example, args)
    assert result.exit_code == 2 and seen == []
    assert expected in " ".join(result.output.replace("│", " ").split())


def test_values_are_checked_by_the_config() -> None:
    seen, result = invoke(Example, ["p", "-o", "x", "--steps", "0"])
    assert seen == [] and isinstance(result.exception, OptionError)
    assert str(result.exception) == "--steps: expected a positive integer, got 0"


def test_yaml_file_builds_the_same_config_as_flags(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("path: p\nout: x\nweights: [0.5, 1]\nnames: ['a,b']\npattern: {q: 2}\n"
                                       "kind: b\nas_json: true\n")
    expected = Example(path="p", out="x", weights=[0.5, 1.0], names=["a,b"], pattern={"q": 2}, kind="b",
                       as_json=True)
    seen, result = invoke(Example, ["--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    assert seen == [expected] == [Example.from_yaml(tmp_path / "run.yaml")]
    seen, _ = invoke(Example, ["--config", str(tmp_path / "run.yaml"), "-o", "y", "--kind", "a"])
    assert (seen[0].out, seen[0].kind, seen[0].pattern) == ("y", "a", {"q": 2}), "flags win over the file"


@pytest.mark.parametrize(("text", "expected"), [
    ("steps: true", "run.yaml: key 'steps': expected an integer, got True"),
    ("weights: [half]", "run.yaml: key 'weights': expected a list of numbers or null, got ['half']"),
    ("kind: c", "run.yaml: key 'kind': expected a or b, got 'c'"),
    ("stepz: 1", "run.yaml: unknown key 'stepz'"),
])
def test_yaml_values_are_typed_naming_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "run.yaml").write_text(f"path: p\nout: x\n{text}\n")
    seen, result = invoke(Example, ["--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2 and seen == []
    assert expected in " ".join(result.output.replace("│", " ").split())
    with pytest.raises(ValueError, match="run.yaml: "):
        Example.from_yaml(tmp_path / "run.yaml")


def test_trainer_options_from_yaml_equal_the_flags(tmp_path: Path) -> None:
    """A mapping (`rank_pattern`), a list (`target_modules`) and a single value for a list in the file."""
    (tmp_path / "run.yaml").write_text("rank_pattern: {q_proj: 4}\ntarget_modules: [q_proj, v_proj]\n"
                                       "modules_to_save: lm_head\nseed: 3\n")
    from_file, result = invoke(TrainConfig, ["--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    from_flags, _ = invoke(TrainConfig, ["--rank-pattern", "q_proj=4", "--target-modules", "q_proj,v_proj",
                                         "--modules-to-save", "lm_head", "--seed", "3"])
    assert from_file == from_flags == [TrainConfig.from_yaml(tmp_path / "run.yaml")]
    lora = from_file[0].lora
    assert lora.rank_pattern == {"q_proj": 4}
    assert (lora.target_modules, lora.modules_to_save) == (["q_proj", "v_proj"], ["lm_head"])


def test_required_options_missing_from_a_file_or_dict_are_named(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("path: p\n")
    with pytest.raises(ValueError, match="run.yaml: key 'out': required, not given"):
        Example.from_yaml(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="--path: required, not given"):
        Example.from_options({"out": "x"})


def test_merge_config_checks_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--adapter: expected at least one adapter"):
        MergeConfig(adapter=[], output="out")
    with pytest.raises(OptionError, match="--weights: expected finite numbers"):
        MergeConfig(adapter=["a"], output="out", weights=[float("nan")])
    (tmp_path / "merge.yaml").write_text("adapter: [a, b]\noutput: out\nweights: [0.7, 0.3]\n"
                                         "dtype: float16\n")
    config = MergeConfig.from_yaml(tmp_path / "merge.yaml", verify=False)
    assert config == MergeConfig(adapter=["a", "b"], output="out", weights=[0.7, 0.3], dtype="float16",
                                 verify=False)
