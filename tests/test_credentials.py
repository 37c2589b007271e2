"""Where Kaggle credentials come from, in which order, and that the key is never shown."""

import io
import json
import os
import stat
import sys

import pytest
import requests

import download
import kaggle_auth
from kaggle_auth import CredentialsError, resolve_credentials

KEY = "0123abcd4567ef89secretkaggle"


@pytest.fixture(autouse=True)
def clean(tmp_path, monkeypatch):
    """An empty HOME and repo folder, no Kaggle variables, no terminal."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ["KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kaggle_auth, "REPO_DIR", tmp_path / "repo")
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    (tmp_path / "repo").mkdir()


def kaggle_json(path, username: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"username": username, "key": KEY}))
    path.chmod(0o600)
    return path


def test_resolution_order(tmp_path, monkeypatch, capsys):
    """Every source present; removing the winner each time walks down the documented order."""
    home = tmp_path / "home"
    flag = kaggle_json(tmp_path / "given.json", "from-flag")
    repo = kaggle_json(tmp_path / "repo" / "kaggle.json", "from-repo")
    monkeypatch.setenv("KAGGLE_USERNAME", "from-env")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    config_dir = kaggle_json(tmp_path / "config" / "kaggle.json", "from-config-dir")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir.parent))
    dot_kaggle = kaggle_json(home / ".kaggle" / "kaggle.json", "from-home")
    (home / ".kaggle" / "access_token").write_text(KEY + "\n")

    assert resolve_credentials(kaggle_json=flag).username == "from-flag"
    assert resolve_credentials().username == "from-repo"
    repo.unlink()
    creds = resolve_credentials()
    assert creds.username == "from-env" and creds.key == KEY and "KAGGLE_USERNAME" in creds.source
    monkeypatch.delenv("KAGGLE_KEY")
    assert resolve_credentials().username == "from-config-dir"
    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    assert resolve_credentials().username == "from-home"
    dot_kaggle.unlink()
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token-from-env")
    assert resolve_credentials().token == "token-from-env"
    monkeypatch.delenv("KAGGLE_API_TOKEN")
    creds = resolve_credentials()
    assert (creds.token, creds.key, creds.source) == (KEY, "", f"the API token in {home / '.kaggle' / 'access_token'}")
    (home / ".kaggle" / "access_token").unlink()
    with pytest.raises(CredentialsError):
        resolve_credentials()
    assert KEY not in repr(creds) and KEY not in creds.describe() and KEY not in capsys.readouterr().out


def test_typed_credentials_are_saved_with_mode_0600_and_the_key_is_never_shown(tmp_path, capsys):
    answers = iter(["alice", "y"])
    secrets = []

    def ask_secret(prompt):  # getpass: the key is read without echo
        secrets.append(prompt)
        return KEY

    creds = resolve_credentials(interactive=True, ask=lambda prompt: next(answers), ask_secret=ask_secret)
    saved = tmp_path / "home" / ".kaggle" / "kaggle.json"
    assert (creds.username, creds.key, creds.source) == ("alice", KEY, "typed at the terminal")
    assert secrets and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {"username": "alice", "key": KEY}
    out = capsys.readouterr().out
    assert "mode 0600" in out and KEY not in out
    # next time they are found without asking
    assert resolve_credentials(interactive=False).source == str(saved)


def test_typed_credentials_can_stay_unsaved(tmp_path):
    answers = iter(["alice", "n"])
    creds = resolve_credentials(interactive=True, ask=lambda prompt: next(answers), ask_secret=lambda p: KEY)
    assert creds.key == KEY and not (tmp_path / "home" / ".kaggle" / "kaggle.json").exists()


def test_no_terminal_and_no_credentials_is_one_clear_error(tmp_path):
    with pytest.raises(CredentialsError) as e:
        resolve_credentials()
    message = str(e.value)
    for option in ["--kaggle-json", str(tmp_path / "repo"), "KAGGLE_USERNAME", "~/.kaggle/kaggle.json",
                   "KAGGLE_CONFIG_DIR", "access_token", "terminal"]:
        assert option in message
    # download.py turns it into an exit message, before anything is downloaded
    with pytest.raises(SystemExit) as e:
        download.main(["--out", str(tmp_path / "d")], connect=lambda creds: pytest.fail("connected"))
    assert "no Kaggle credentials found" in str(e.value.code) and "--zip PATH" in str(e.value.code)  # and by hand


def test_bad_kaggle_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"username": "alice"}')
    with pytest.raises(CredentialsError, match="bad.json is not a kaggle.json"):
        resolve_credentials(kaggle_json=tmp_path / "bad.json")
    with pytest.raises(CredentialsError, match="--kaggle-json .*missing.json: no such file"):
        resolve_credentials(kaggle_json=tmp_path / "missing.json")


@pytest.mark.parametrize("mode", [0o644, 0o640])  # readable by everyone, or by the group alone
def test_kaggle_json_readable_by_others_is_pointed_out(tmp_path, capsys, mode):
    path = kaggle_json(tmp_path / "repo" / "kaggle.json", "alice")
    path.chmod(mode)
    resolve_credentials()
    assert f"chmod 600 {path}" in capsys.readouterr().out


def test_kaggle_import_failure_becomes_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)  # as if kaggle (or six) were missing
    with pytest.raises(CredentialsError, match="kaggle package cannot be imported.*pip install"):
        kaggle_auth.kaggle_api(kaggle_auth.Credentials("test", "alice", KEY))


def test_kaggle_api_authenticates_with_the_chosen_key_and_leaves_no_trace_in_the_environment(capsys):
    api = kaggle_auth.kaggle_api(kaggle_auth.Credentials("test", "alice", KEY))  # a key authenticates offline
    assert api.config_values["username"] == "alice" and api.config_values["key"] == KEY
    assert "KAGGLE_KEY" not in os.environ and "KAGGLE_USERNAME" not in os.environ
    assert KEY not in capsys.readouterr().out


@pytest.mark.parametrize("failure, message", [
    (lambda: requests.exceptions.ConnectionError("Max retries exceeded"), "could not reach Kaggle.*connection"),
    (lambda: requests.exceptions.HTTPError("401 Client Error: Unauthorized"), "did not accept the credentials"),
])
def test_a_network_failure_is_not_blamed_on_the_credentials(failure, message, monkeypatch):
    """kaggle 2.x checks an access token with Kaggle's servers, so offline that check fails on the network."""
    kaggle_auth.kaggle_api(kaggle_auth.Credentials("test", "alice", KEY))  # imports kaggle, which a key lets through
    from kaggle.api.kaggle_api_extended import KaggleApi

    def authenticate(self):
        raise failure()

    monkeypatch.setattr(KaggleApi, "authenticate", authenticate)
    with pytest.raises(CredentialsError, match=message):
        kaggle_auth.kaggle_api(kaggle_auth.Credentials("KAGGLE_API_TOKEN", token="abc"))


def test_kaggle_json_saved_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "repo" / "kaggle.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"username": "alice", "key": KEY}).encode())  # as Notepad saves it
    path.chmod(0o600)
    creds = resolve_credentials()
    assert (creds.username, creds.key) == ("alice", KEY)


@pytest.mark.parametrize("content, message", [
    ({"username": "alice", "key": None}, '"key" must be a non-empty string, got null'),
    ({"username": "alice", "key": "  "}, '"key" must be a non-empty string, got an empty string'),
    ({"username": 42, "key": KEY}, '"username" must be a non-empty string, got int'),
])
def test_kaggle_json_with_a_missing_value_names_the_field(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(CredentialsError, match=f"bad.json: {message}"):
        resolve_credentials(kaggle_json=tmp_path / "bad.json")


@pytest.mark.parametrize("given, missing", [("KAGGLE_USERNAME", "KAGGLE_KEY"), ("KAGGLE_KEY", "KAGGLE_USERNAME")])
def test_half_of_the_environment_variables_says_which_one_is_missing(given, missing, monkeypatch):
    monkeypatch.setenv(given, "alice" if given == "KAGGLE_USERNAME" else KEY)
    with pytest.raises(CredentialsError, match=f"{given} is set, but {missing} is not") as e:
        resolve_credentials()
    assert KEY not in str(e.value)


def test_a_blank_environment_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "   ")
    with pytest.raises(CredentialsError, match="KAGGLE_USERNAME is set, but KAGGLE_KEY is not"):
        resolve_credentials()


def test_kaggle_json_in_the_xdg_config_folder_is_found(tmp_path, monkeypatch):
    """kaggle 2.x also looks in ~/.config/kaggle, or $XDG_CONFIG_HOME/kaggle."""
    path = kaggle_json(tmp_path / "home" / ".config" / "kaggle" / "kaggle.json", "from-xdg-default")
    assert resolve_credentials().source == str(path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = kaggle_json(tmp_path / "xdg" / "kaggle" / "kaggle.json", "from-xdg")
    assert resolve_credentials().username == "from-xdg"


def test_spaces_around_the_values_of_kaggle_json_are_dropped(tmp_path):
    path = tmp_path / "repo" / "kaggle.json"
    path.write_text(json.dumps({"username": " alice\n", "key": f" {KEY}\n"}))
    path.chmod(0o600)
    creds = resolve_credentials()
    assert (creds.username, creds.key) == ("alice", KEY)


def test_pressing_enter_at_the_save_question_saves(tmp_path):
    answers = iter(["alice", ""])  # [Y/n]: yes is the default
    resolve_credentials(interactive=True, ask=lambda prompt: next(answers), ask_secret=lambda p: KEY)
    assert json.loads((tmp_path / "home" / ".kaggle" / "kaggle.json").read_text())["username"] == "alice"


@pytest.mark.parametrize("username, key", [("alice", "  "), ("", KEY)])
def test_typed_credentials_need_both_halves(username, key):
    answers = iter([username, "y"])
    with pytest.raises(CredentialsError, match="username and key are both needed"):
        resolve_credentials(interactive=True, ask=lambda prompt: next(answers), ask_secret=lambda p: key)


@pytest.mark.parametrize("at_key", [False, True])
@pytest.mark.parametrize("pressed", [EOFError, KeyboardInterrupt])  # Ctrl-D, Ctrl-C
def test_leaving_a_prompt_lists_the_other_ways_not_a_traceback(pressed, at_key):
    def stop(prompt):
        raise pressed

    ask, ask_secret = (lambda prompt: "alice", stop) if at_key else (stop, lambda prompt: KEY)
    with pytest.raises(CredentialsError, match=r"no Kaggle credentials found, and none typed\. Any one of these "
                                               r"works(.|\n)*--kaggle-json"):
        resolve_credentials(interactive=True, ask=ask, ask_secret=ask_secret)


def test_saving_over_a_readable_kaggle_json_leaves_it_0600(tmp_path):
    """An existing file keeps its mode through open(O_CREAT), so the key must not land in a file others can read."""
    path = tmp_path / "home" / ".kaggle" / "kaggle.json"
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    path.chmod(0o644)
    kaggle_auth.save_kaggle_json(path, "alice", KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text())["key"] == KEY


def test_typed_credentials_are_saved_where_kaggle_config_dir_points(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "config"))
    answers = iter(["alice", "y"])
    resolve_credentials(interactive=True, ask=lambda prompt: next(answers), ask_secret=lambda p: KEY)
    assert json.loads((tmp_path / "config" / "kaggle.json").read_text())["username"] == "alice"
    assert not (tmp_path / "home" / ".kaggle" / "kaggle.json").exists()


def test_kaggle_api_token_may_name_a_file_holding_the_token(tmp_path, monkeypatch):
    (tmp_path / "token.txt").write_text("token-in-a-file\n")
    monkeypatch.setenv("KAGGLE_API_TOKEN", str(tmp_path / "token.txt"))
    creds = resolve_credentials()
    assert (creds.token, creds.source) == ("token-in-a-file", f"the API token in {tmp_path / 'token.txt'}")


def test_an_empty_access_token_file_is_no_credentials(tmp_path):
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "access_token").write_text("\n")
    with pytest.raises(CredentialsError, match="no Kaggle credentials found"):
        resolve_credentials()


def test_a_network_failure_met_while_handling_another_error_is_still_the_network():
    """requests and kaggle raise their own errors inside `except` blocks: the connection error is the context."""
    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded")
        except requests.exceptions.ConnectionError:
            raise ValueError("could not fetch the token's user")  # the first error is its context
    except ValueError as e:
        assert kaggle_auth.unreachable(e)
    assert not kaggle_auth.unreachable(ValueError("401 Unauthorized"))
