"""Dataclass argument groups -> argparse, with every default shown in --help.

Each script declares its arguments as a few dataclasses (model, LoRA, privacy, training, ...), one
field per flag with a `help` in its metadata. `build_parser` turns them into one argparse parser whose
groups mirror the dataclasses; `split_namespace` turns the parsed namespace back into the dataclasses.
A YAML config (`--config FILE`) may set any field; the command line wins over it.
"""

import argparse
import dataclasses
import sys
import typing


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(field):
    """(argparse type, nargs, is_bool) for a dataclass field annotation."""
    annotation = field.type
    if isinstance(annotation, str):  # `from __future__ import annotations` style
        annotation = eval(annotation, vars(typing))  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    nargs = None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        annotation = non_none[0]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        nargs = "+"
        annotation = args[0]
    if annotation is bool:
        return _bool, nargs, True
    return annotation, nargs, False


def build_parser(
    description: str, groups: dict[str, type], config_flag: bool = True
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if config_flag:
        parser.add_argument(
            "--config",
            type=str,
            default=None,
            help="YAML file whose keys set any flag below; the command line wins",
        )
    for title, cls in groups.items():
        group = parser.add_argument_group(title)
        for field in dataclasses.fields(cls):
            arg_type, nargs, is_bool = _field_type(field)
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            # argparse prints no default for an empty or blank help: name the field instead
            kwargs = dict(default=default, help=field.metadata.get("help") or field.name.replace("_", " "))
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
            if is_bool:
                # `--flag` turns it on, `--flag false` turns it off again (e.g. over a YAML config)
                kwargs.update(type=_bool, nargs="?", const=True, metavar="BOOL")
            else:
                kwargs.update(type=arg_type)
                if nargs:
                    kwargs["nargs"] = nargs
            group.add_argument(f"--{field.name}", **kwargs)
    return parser


def parse_into(parser: argparse.ArgumentParser, groups: dict[str, type], argv=None) -> argparse.Namespace:
    """Parse argv (YAML config first, then command line) into a namespace holding one dataclass per group."""
    namespace = parser.parse_args(argv)
    config_path = getattr(namespace, "config", None)
    if config_path:
        parser.set_defaults(**_read_config(parser, groups, config_path))
        namespace = parser.parse_args(argv)
    resolved = argparse.Namespace(config=config_path)
    for title, cls in groups.items():
        values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
        setattr(resolved, _group_attr(title), cls(**values))
    return resolved


def _read_config(parser, groups: dict[str, type], config_path: str) -> dict:
    """The YAML config's values, each checked against its field's type; any problem is a usage error."""
    import yaml

    try:
        with open(config_path, encoding="utf-8") as handle:
            overrides = yaml.safe_load(handle)
    except OSError as error:
        parser.error(f"--config {config_path}: {error.strerror or error}")
    except yaml.YAMLError as error:
        parser.error(f"--config {config_path}: not valid YAML ({str(error).splitlines()[0]})")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        parser.error(
            f"--config {config_path}: expected a mapping of flag names to values, got {type(overrides).__name__}"
        )
    fields = {f.name: f for cls in groups.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        parser.error(f"{config_path}: unknown keys {unknown}")
    checked = {}
    for key, value in overrides.items():
        problem, checked[key] = _check_config_value(fields[key], value)
        if problem:
            parser.error(f"{config_path}: {key}: {problem}")
    return checked


def _check_config_value(field, value):
    """(problem or None, the value converted like the command line would) for one YAML value."""
    arg_type, nargs, is_bool = _field_type(field)
    if value is None:
        return None, None
    if not nargs:
        return _check_scalar(arg_type, is_bool, value)
    if not isinstance(value, list):
        return f"expected a list, got {value!r}", value
    checked = [_check_scalar(arg_type, is_bool, v) for v in value]
    problems = [p for p, _ in checked if p]
    return (problems[0] if problems else None), [v for _, v in checked]


def _check_scalar(arg_type, is_bool: bool, value):
    if is_bool and isinstance(value, bool):
        return None, value
    if is_bool and not isinstance(value, str):
        return f"expected true or false, got {value!r}", value
    if isinstance(value, str):  # as the command line would give it: through the flag's own conversion
        try:
            return None, arg_type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return f"expected {'true or false' if is_bool else arg_type.__name__}, got {value!r}", value
    if isinstance(value, bool):  # YAML's true/false is an int to Python; never a number here
        return f"expected {getattr(arg_type, '__name__', arg_type)}, got {value!r}", value
    if arg_type is float and isinstance(value, (int, float)):
        return None, float(value)
    if arg_type is int and isinstance(value, int):
        return None, value
    return f"expected {getattr(arg_type, '__name__', arg_type)}, got {value!r}", value


def _group_attr(title: str) -> str:
    return title.lower().replace(" ", "_")


def to_dict(args: argparse.Namespace) -> dict:
    """The resolved arguments as plain JSON-able dicts, one per group."""
    out = {}
    for key, value in vars(args).items():
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


class UserError(ValueError):
    """A problem the user can fix: every script prints str(error) as one line and exits with code 2.

    Every user-facing error class derives from it; anything else is a bug and shows its traceback.
    """


class ArgumentErrors(UserError):
    """Every problem with the arguments, reported at once (joined on one line)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def run_main(main, parse_args, argv=None) -> int:
    """Run a script's main(parse_args(argv)): the one exit path of every script.

    A UserError is one line on stderr and exit code 2; Ctrl-C is exit code 130.
    """
    try:
        main(parse_args(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0
