"""utils/cli.py: dataclass groups -> argparse (defaults in --help), YAML configs, and the one exit path."""

import json
import re
from dataclasses import dataclass, field

import pytest

from utils import cli


@dataclass
class Alpha:
    name: str = field(default="x", metadata={"help": "a name"})
    count: int = field(default=3, metadata={"help": "how many"})
    flag: bool = field(default=False, metadata={"help": "a switch, off by default"})
    keep: bool = field(default=True, metadata={"help": "a switch, on by default"})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "some sizes"})
    limit: float | None = field(default=None, metadata={"help": "an optional limit"})
    mode: str = field(default="fast", metadata={"help": "a mode", "choices": ["fast", "slow"]})


@dataclass
class Beta:
    rate: float = 0.5  # no help in the metadata
    tags: list[str] = field(default_factory=list, metadata={"help": "tags", "choices": ["a", "b", "c"]})


@dataclass
class Stringly:  # annotations as strings, as under `from __future__ import annotations`
    when: "int | None" = field(default=None, metadata={"help": "optional int"})
    names: "list[str]" = field(default_factory=lambda: ["p"], metadata={"help": "names"})
    on: "bool" = field(default=False, metadata={"help": "bool"})


GROUPS = {"alpha": Alpha, "Beta Group": Beta}


def parse(argv, groups=GROUPS, config_flag=True):
    return cli.parse_into(cli.build_parser("test", groups, config_flag=config_flag), groups, argv)


def help_text(capsys, groups=GROUPS) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser("test", groups).parse_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """--flag -> its help entry (the option line and its continuation lines) joined on one line."""
    blocks = re.split(r"\n(?=  -)", text)
    out = {}
    for block in blocks:
        match = re.match(r"\s*(?:-\w, )?--(\w+)", block)
        if match:
            out[match.group(1)] = " ".join(block.split())
    return out


# --- build_parser / --help ------------------------------------------------------------------------------------


def test_help_shows_every_fields_default_including_none_and_lists(capsys):
    blocks = option_blocks(help_text(capsys))
    expected = {
        "name": "x",
        "count": "3",
        "flag": "False",
        "keep": "True",
        "sizes": "[1, 2]",
        "limit": "None",
        "mode": "fast",
        "tags": "[]",
        "config": "None",
    }
    for name, default in expected.items():
        assert f"(default: {default})" in blocks[name], (name, blocks[name])


def test_help_shows_the_default_of_a_field_without_help(capsys):
    assert "(default: 0.5)" in option_blocks(help_text(capsys))["rate"]


def test_help_has_one_argument_group_per_dataclass_titled_by_its_key(capsys):
    text = help_text(capsys)
    assert "\nalpha:\n" in text and "\nBeta Group:\n" in text
    assert (
        text.index("\nalpha:\n")
        < text.index("\n  --name")
        < text.index("\nBeta Group:\n")
        < text.index("\n  --rate")
    )


def test_help_lists_choices_and_marks_bools_and_lists(capsys):
    blocks = option_blocks(help_text(capsys))
    assert blocks["mode"].startswith("--mode {fast,slow}")
    assert blocks["flag"].startswith("--flag [BOOL]")
    assert blocks["sizes"].startswith("--sizes SIZES [SIZES ...]")
    assert blocks["tags"].startswith("--tags {a,b,c} [{a,b,c} ...]")


def test_config_flag_is_left_out_when_asked(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser("test", GROUPS, config_flag=False).parse_args(["--help"])
    assert "--config" not in capsys.readouterr().out
    assert parse([], config_flag=False).config is None


# --- parsing ------------------------------------------------------------------------------------------------


def test_no_flags_gives_the_dataclass_defaults():
    args = parse([])
    assert args.alpha == Alpha() and args.beta_group == Beta() and args.config is None


def test_group_attribute_is_the_title_lowercased_with_underscores():
    args = parse([])
    assert isinstance(args.beta_group, Beta) and isinstance(args.alpha, Alpha)


def test_bare_bool_flag_turns_on_and_flag_false_turns_off():
    assert parse(["--flag"]).alpha.flag is True
    assert parse(["--flag", "--count", "4"]).alpha.flag is True  # a following option is not its value
    assert parse(["--keep", "false"]).alpha.keep is False
    assert parse(["--flag", "false"]).alpha.flag is False
    for text, value in [
        ("1", True),
        ("yes", True),
        ("ON", True),
        ("True", True),
        ("0", False),
        ("no", False),
        ("off", False),
    ]:
        assert parse(["--flag", text]).alpha.flag is value, text


def test_bool_flag_rejects_a_non_boolean_word(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--flag", "maybe"])
    assert exit_info.value.code == 2
    assert "expected a boolean, got 'maybe'" in capsys.readouterr().err


def test_list_field_takes_one_or_more_values_of_the_element_type():
    assert parse(["--sizes", "4", "5", "6"]).alpha.sizes == [4, 5, 6]
    assert parse(["--sizes", "7"]).alpha.sizes == [7]
    assert parse(["--tags", "a", "c"]).beta_group.tags == ["a", "c"]


def test_list_default_is_a_fresh_copy_per_parse():
    first = parse([])
    first.alpha.sizes.append(99)
    assert parse([]).alpha.sizes == [1, 2]


def test_optional_field_is_none_unless_given_and_then_of_the_inner_type():
    assert parse([]).alpha.limit is None
    value = parse(["--limit", "2.5"]).alpha.limit
    assert value == 2.5 and isinstance(value, float)


def test_values_are_converted_to_the_annotated_type():
    args = parse(["--count", "7", "--rate", "1e-3", "--name", "y"])
    assert args.alpha.count == 7 and isinstance(args.alpha.count, int)
    assert args.beta_group.rate == 1e-3 and args.alpha.name == "y"


@pytest.mark.parametrize(
    "argv", [["--mode", "medium"], ["--tags", "z"], ["--count", "three"], ["--nonexistent", "1"]]
)
def test_bad_value_or_unknown_flag_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_string_annotations_are_understood():
    groups = {"s": Stringly}
    args = parse(["--when", "5", "--names", "a", "b", "--on"], groups)
    assert args.s == Stringly(when=5, names=["a", "b"], on=True)
    assert parse([], groups).s == Stringly()


# --- YAML --config ----------------------------------------------------------------------------------------------


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_config_sets_fields_and_the_command_line_wins(tmp_path):
    config = write_yaml(tmp_path, "count: 10\nname: from_yaml\nflag: true\nsizes: [7, 8]\nrate: 0.25\n")
    args = parse(["--config", config, "--count", "11", "--flag", "false"])
    assert args.config == config
    assert args.alpha.count == 11  # the command line wins
    assert args.alpha.flag is False  # `--flag false` undoes the YAML's true
    assert args.alpha.name == "from_yaml" and args.alpha.sizes == [7, 8] and args.beta_group.rate == 0.25


def test_command_line_wins_whatever_its_position_relative_to_config(tmp_path):
    config = write_yaml(tmp_path, "count: 10\n")
    assert parse(["--count", "12", "--config", config]).alpha.count == 12


def test_yaml_config_rejects_unknown_keys_naming_them(tmp_path, capsys):
    config = write_yaml(tmp_path, "count: 10\nbogus: 1\nalso_bogus: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--config", config])
    assert exit_info.value.code == 2
    assert "unknown keys ['also_bogus', 'bogus']" in capsys.readouterr().err


def test_empty_yaml_config_changes_nothing(tmp_path):
    assert parse(["--config", write_yaml(tmp_path, "")]).alpha == Alpha()


# --- to_dict ------------------------------------------------------------------------------------------------


def test_to_dict_gives_one_plain_json_able_dict_per_group_plus_config():
    args = parse(["--sizes", "3", "--limit", "1.5"])
    out = cli.to_dict(args)
    assert out == {
        "config": None,
        "alpha": {
            "name": "x",
            "count": 3,
            "flag": False,
            "keep": True,
            "sizes": [3],
            "limit": 1.5,
            "mode": "fast",
        },
        "beta_group": {"rate": 0.5, "tags": []},
    }
    assert json.loads(json.dumps(out)) == out


def test_to_dict_copies_so_editing_it_leaves_the_arguments_alone():
    args = parse([])
    cli.to_dict(args)["alpha"]["sizes"].append(5)
    assert args.alpha.sizes == [1, 2]


# --- errors and run_main ----------------------------------------------------------------------------------------


def test_argument_errors_join_every_problem_on_one_line_and_are_user_errors():
    error = cli.ArgumentErrors(["--a must be > 0", "--b must be < 1", "set --c"])
    assert str(error) == "--a must be > 0; --b must be < 1; set --c"
    assert "\n" not in str(error)
    assert error.problems == ["--a must be > 0", "--b must be < 1", "set --c"]
    assert isinstance(error, cli.UserError) and isinstance(error, ValueError)


class CustomUserError(cli.UserError):
    pass


def raising(exception):
    def main(_args):
        raise exception

    return main


def test_run_main_returns_0_and_passes_the_parsed_arguments_to_main():
    seen = []
    assert cli.run_main(seen.append, lambda argv: ("parsed", argv), ["--x"]) == 0
    assert seen == [("parsed", ["--x"])]


@pytest.mark.parametrize(
    "error", [CustomUserError("the file is missing"), cli.UserError("the file is missing")]
)
def test_run_main_turns_a_user_error_into_exit_2_and_one_error_line(error, capsys):
    assert cli.run_main(raising(error), lambda argv: None, []) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the file is missing\n" and captured.out == ""


def test_run_main_prints_every_argument_problem_on_the_one_line(capsys):
    assert cli.run_main(raising(cli.ArgumentErrors(["p1", "p2"])), lambda argv: None, []) == 2
    assert capsys.readouterr().err == "error: p1; p2\n"


def test_run_main_handles_a_user_error_raised_while_parsing(capsys):
    def parse_args(argv):
        raise CustomUserError("bad flags")

    assert cli.run_main(lambda args: None, parse_args, []) == 2
    assert capsys.readouterr().err == "error: bad flags\n"


def test_run_main_returns_130_on_keyboard_interrupt(capsys):
    assert cli.run_main(raising(KeyboardInterrupt()), lambda argv: None, []) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug"), FileNotFoundError("no such file"), ValueError("plain ValueError"), KeyError("k")],
)
def test_run_main_lets_any_other_exception_propagate_with_its_traceback(error, capsys):
    with pytest.raises(type(error)) as raised:
        cli.run_main(raising(error), lambda argv: None, [])
    assert raised.value is error and raised.value.__traceback__ is not None
    assert "error:" not in capsys.readouterr().err


# --- a bad --config is a usage error, never a traceback ----------------------------------------------------


def test_yaml_config_that_is_not_a_mapping_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        parse(["--config", write_yaml(tmp_path, "42\n")])


def test_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_yaml_value_of_the_wrong_type_is_rejected(tmp_path):
    config = write_yaml(tmp_path, "count: 1.5\n")
    try:
        args = parse(["--config", config])
    except SystemExit:
        return
    assert isinstance(args.alpha.count, int)


def test_yaml_string_values_go_through_the_fields_type(tmp_path):
    args = parse(["--config", write_yaml(tmp_path, "count: '9'\nflag: 'yes'\n")])
    assert args.alpha.count == 9 and args.alpha.flag is True
