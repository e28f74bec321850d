"""Every entry point: --help exits 0 and shows each flag's default; scripts are never imported by library code;
the light utils modules do not import transformers or peft."""

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import audit_privacy
import evaluate_qa
import infer
import train_dp_lora
from bench import bench_generate, bench_step, gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_dp_lora", "evaluate_qa", "infer", "audit_privacy")

ENTRY_POINTS = {
    "train_dp_lora.py": train_dp_lora,
    "infer.py": infer,
    "evaluate_qa.py": evaluate_qa,
    "audit_privacy.py": audit_privacy,
    "bench/bench_step.py": bench_step,
    "bench/bench_generate.py": bench_generate,
    "bench/gpu_check.py": gpu_check,
}


def help_of(module, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code in (0, None)
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def option_blocks(text: str) -> dict[str, str]:
    """--flag -> its help entry (option line and continuation lines) on one line; -h/--help left out."""
    out = {}
    for block in re.split(r"\n(?=  -)", text):
        match = re.match(r"\s*--(\w+)", block)
        if match:
            out[match.group(1)] = " ".join(block.split())
    return out


def fields_of(module):
    return [f for cls in module.GROUPS.values() for f in dataclasses.fields(cls)]


def params(gpu_check_mark=None):
    return [
        pytest.param(
            module, id=name, marks=[gpu_check_mark] if gpu_check_mark and module is gpu_check else []
        )
        for name, module in ENTRY_POINTS.items()
    ]


@pytest.mark.parametrize("module", params())
def test_help_exits_0_and_shows_the_default_of_every_flag(module, capsys):
    blocks = option_blocks(help_of(module, capsys))
    assert blocks, "no flags in --help"
    missing = [name for name, block in blocks.items() if "(default:" not in block]
    assert not missing, f"flags without a default in --help: {missing}"


@pytest.mark.parametrize("module", params())
def test_help_lists_every_dataclass_field_and_shows_its_default_where_it_has_help(module, capsys):
    blocks = option_blocks(help_of(module, capsys))
    fields = fields_of(module)
    assert {f.name for f in fields} <= set(blocks), sorted({f.name for f in fields} - set(blocks))
    with_help = [f.name for f in fields if f.metadata.get("help", "").strip()]
    assert [name for name in with_help if "(default:" not in blocks[name]] == []


def test_audit_help_is_of_its_own_audit_flags_not_the_training_flags(capsys):
    text = help_of(audit_privacy, capsys)
    blocks = option_blocks(text)
    assert set(blocks) == {f.name for f in fields_of(audit_privacy)}
    assert "--num_canaries" in text and "--epsilon" not in text and "--lora_r" not in text
    assert "Training flags follow `--`." in " ".join(text.split())


@pytest.mark.parametrize("module", [train_dp_lora, infer, evaluate_qa])
def test_scripts_with_a_yaml_config_offer_config_in_help(module, capsys):
    assert "config" in option_blocks(help_of(module, capsys))


@pytest.mark.parametrize("module", [train_dp_lora, infer, evaluate_qa, audit_privacy])
def test_top_level_scripts_exit_through_run_main_and_get_2_for_bad_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.cli_main(["--no_such_flag"])
    assert exit_info.value.code == 2  # argparse's usage error, before anything runs


# --- library code never imports a script ------------------------------------------------------------------


def non_test_sources() -> list[Path]:
    files = (
        sorted(REPO.glob("*.py"))
        + sorted((REPO / "utils").rglob("*.py"))
        + sorted((REPO / "bench").rglob("*.py"))
    )
    assert any(p.name == "train_dp_lora.py" for p in files) and any(p.parent.name == "utils" for p in files)
    return [p for p in files if "tests" not in p.relative_to(REPO).parts]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth, and of import_module / __import__ calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "bench" or node.module.startswith("bench."):
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_non_test_module_imports_a_script():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in non_test_sources()
        for line, module in imported_modules(path)
        if module.split(".")[0] in SCRIPTS
    ]
    assert offenders == []


def test_no_non_test_module_has_a_textual_script_import():
    pattern = re.compile(r"^\s*(?:import|from)\s+(?:" + "|".join(SCRIPTS) + r")\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for path in non_test_sources()
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_utils_never_imports_bench():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sorted((REPO / "utils").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] == "bench"
    ]
    assert offenders == []


def test_the_import_scan_does_see_imports():
    """The scan has teeth: it finds the imports this very file makes."""
    modules = {module for _, module in imported_modules(Path(__file__))}
    assert {"train_dp_lora", "audit_privacy", "bench.gpu_check"} <= modules


# --- lazy heavy imports ---------------------------------------------------------------------------------

LIGHT_MODULES = (
    "utils.cli",
    "utils.data",
    "utils.privacy",
    "utils.privacy_record",
    "utils.run_dir",
    "utils.train_args",
)


def test_light_utils_modules_do_not_import_transformers_or_peft():
    code = (
        "import json, sys\n"
        f"import {', '.join(LIGHT_MODULES)}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
