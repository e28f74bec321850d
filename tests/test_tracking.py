"""utils/tracking.py: W&B credentials and mode, per-tracker init arguments, and flat hyperparameters."""

import os

import pytest

from utils import tracking

WANDB_NETRC = "machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n"
OTHER_NETRC = "machine example.com\n  login user\n  password secret\n"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No W&B key, no W&B mode, and a HOME (hence ~/.netrc) and NETRC that hold nothing."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "NETRC"):
        monkeypatch.setenv(
            name, ""
        )  # recorded first, so whatever the code under test sets is undone afterwards
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write_netrc(path, text, mode=0o600):
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


# --- wandb_has_credentials ------------------------------------------------------------------------------------


def test_no_key_and_no_netrc_means_no_credentials(clean_env):
    assert tracking.wandb_has_credentials() is False


def test_wandb_api_key_is_credentials(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert tracking.wandb_has_credentials() is True


def test_empty_wandb_api_key_is_not_credentials(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert tracking.wandb_has_credentials() is False


def test_netrc_in_home_with_a_wandb_host_is_credentials(clean_env):
    write_netrc(clean_env / ".netrc", WANDB_NETRC)
    assert tracking.wandb_has_credentials() is True


def test_netrc_without_a_wandb_host_is_not_credentials(clean_env):
    write_netrc(clean_env / ".netrc", OTHER_NETRC)
    assert tracking.wandb_has_credentials() is False


def test_unparsable_netrc_is_not_credentials_and_does_not_raise(clean_env):
    import netrc

    path = write_netrc(clean_env / ".netrc", "machine api.wandb.ai\n  bogus token\n")
    with pytest.raises(netrc.NetrcParseError):
        netrc.netrc(str(path))
    assert tracking.wandb_has_credentials() is False


def test_netrc_named_by_the_netrc_env_var_with_a_wandb_host_is_credentials(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "custom_netrc", WANDB_NETRC)))
    assert tracking.wandb_has_credentials() is True


def test_group_readable_netrc_with_a_wandb_host_is_credentials(clean_env):
    write_netrc(clean_env / ".netrc", WANDB_NETRC, mode=0o644)
    assert tracking.wandb_has_credentials() is True


# --- prepare_wandb_environment ----------------------------------------------------------------------------------


def test_without_credentials_wandb_is_set_offline_and_silent(clean_env):
    assert tracking.prepare_wandb_environment() == "offline"
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_SILENT"] == "true"


def test_without_credentials_an_explicit_online_mode_is_forced_offline(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.prepare_wandb_environment() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("mode", ["disabled", "offline", "dryrun"])
def test_an_explicit_disabled_offline_or_dryrun_mode_is_left_alone(clean_env, monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    tracking.prepare_wandb_environment()
    assert os.environ["WANDB_MODE"] == mode


def test_dryrun_reports_offline(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.prepare_wandb_environment() == "offline"


def test_disabled_is_not_reported_as_online(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.prepare_wandb_environment() != "online"


def test_with_credentials_the_mode_is_left_unset_and_reported_online(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert tracking.prepare_wandb_environment() == "online"
    assert "WANDB_MODE" not in os.environ


def test_an_explicit_wandb_silent_is_kept(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "false")
    tracking.prepare_wandb_environment()
    assert os.environ["WANDB_SILENT"] == "false"


# --- tracker_init_kwargs / tracker_names ----------------------------------------------------------------------


def test_wandb_init_kwargs_put_the_run_under_the_absolute_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = tracking.tracker_init_kwargs("wandb", "runs/out", job_type="eval")
    assert kwargs == {"wandb": {"dir": str(tmp_path / "runs" / "out"), "job_type": "eval"}}
    assert os.path.isabs(kwargs["wandb"]["dir"])


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_other_trackers_get_no_init_kwargs(report_to, tmp_path):
    assert tracking.tracker_init_kwargs(report_to, str(tmp_path), job_type="eval") == {}


@pytest.mark.parametrize(
    "report_to, names", [("none", []), ("wandb", ["wandb"]), ("tensorboard", ["tensorboard"])]
)
def test_tracker_names_are_empty_for_none_else_the_one_tracker(report_to, names):
    assert tracking.tracker_names(report_to) == names


# --- wandb_run_dir ------------------------------------------------------------------------------------------


class FakeAccelerator:
    def __init__(self, run=None, error=None):
        self.run, self.error = run, error

    def get_tracker(self, name, unwrap=False):
        if self.error:
            raise self.error
        return self.run


def test_wandb_run_dir_is_the_parent_of_the_runs_files_dir():
    run = type("Run", (), {"dir": "/out/wandb/offline-run-1/files"})()
    assert tracking.wandb_run_dir(FakeAccelerator(run)) == "/out/wandb/offline-run-1"


@pytest.mark.parametrize(
    "accelerator",
    [
        FakeAccelerator(error=ValueError("no wandb")),
        FakeAccelerator(error=KeyError("wandb")),
        FakeAccelerator(run=object()),
    ],
)
def test_wandb_run_dir_is_none_without_a_wandb_run(accelerator):
    assert tracking.wandb_run_dir(accelerator) is None


# --- flatten_config -----------------------------------------------------------------------------------------


def test_flatten_config_turns_groups_into_flat_scalars_lists_to_strings_and_none_to_empty():
    resolved = {
        "config": None,
        "model": {"model": "gemma", "load_in_4bit": False, "dtype": "auto"},
        "lora": {"lora_r": 8, "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "v_proj"]},
        "privacy": {"delta": None, "epsilon": 3.0},
    }
    flat = tracking.flatten_config(resolved)
    assert flat == {
        "model": "gemma",
        "load_in_4bit": False,
        "dtype": "auto",
        "lora_r": 8,
        "lora_dropout": 0.05,
        "lora_target_modules": "['q_proj', 'v_proj']",
        "delta": "",
        "epsilon": 3.0,
    }
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_flatten_config_keeps_a_top_level_scalar_and_drops_a_top_level_none():
    assert tracking.flatten_config({"config": "run.yaml", "g": {"a": 1}}) == {"config": "run.yaml", "a": 1}
    assert tracking.flatten_config({"config": None, "g": {"a": 1}}) == {"a": 1}


def test_flatten_config_of_real_training_arguments_is_all_scalars():
    from utils import cli, train_args

    flat = tracking.flatten_config(
        cli.to_dict(train_args.parse_args(["--lora_target_modules", "q_proj", "v_proj"]))
    )
    assert (
        flat["lora_target_modules"] == "['q_proj', 'v_proj']"
        and flat["delta"] == ""
        and flat["epsilon"] == 3.0
    )
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_flatten_config_turns_a_top_level_list_into_a_string():
    assert tracking.flatten_config({"given": ["a", "b"]}) == {"given": "['a', 'b']"}
