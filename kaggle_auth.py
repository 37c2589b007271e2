"""Kaggle credentials: found in a fixed order, announced by where they came from, the key never shown.

Order (the first that exists wins):
  1. --kaggle-json PATH
  2. kaggle.json in the repo folder
  3. the KAGGLE_USERNAME and KAGGLE_KEY environment variables
  4. kaggle.json in $KAGGLE_CONFIG_DIR, else in ~/.kaggle (or ~/.config/kaggle, where kaggle 2.x also looks)
  5. the newer API token: $KAGGLE_API_TOKEN, else ~/.kaggle/access_token
  6. on a terminal: ask for the username and key (the key hidden), and offer to save them with mode 0600
"""

import contextlib
import getpass
import io
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils import REPO_DIR

API_PAGE = "https://www.kaggle.com/settings/api"


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Credentials:
    source: str  # where they came from, for the log line
    username: str = ""
    key: str = field(default="", repr=False)  # legacy API key (kaggle.json)
    token: str = field(default="", repr=False)  # newer API token (access_token)

    def describe(self) -> str:
        return f"Kaggle credentials: {self.source}" + (f" (user {self.username})" if self.username else "")


def half_set() -> str:
    """' (KAGGLE_USERNAME is set, but KAGGLE_KEY is not: ...)' when only one of the two is set, else ''."""
    given = [name for name in ("KAGGLE_USERNAME", "KAGGLE_KEY") if os.environ.get(name, "").strip()]
    if len(given) != 1:
        return ""
    missing = "KAGGLE_KEY" if given == ["KAGGLE_USERNAME"] else "KAGGLE_USERNAME"
    return f" ({given[0]} is set, but {missing} is not: they work only as a pair)"


def no_credentials_message(repo_dir, why: str = "no terminal to ask for them") -> str:
    return (f"no Kaggle credentials found{half_set()}, and {why}. Any one of these works "
            f"(create a key at {API_PAGE}, \"Create New Token\"):\n"
            f"  - python download.py --kaggle-json PATH/TO/kaggle.json\n"
            f"  - put kaggle.json in the repo folder {repo_dir}\n"
            f"  - export KAGGLE_USERNAME=you KAGGLE_KEY=...\n"
            f"  - ~/.kaggle/kaggle.json (or $KAGGLE_CONFIG_DIR/kaggle.json), then chmod 600 it\n"
            f"  - the newer API token in ~/.kaggle/access_token (or $KAGGLE_API_TOKEN)\n"
            f"  - run python download.py in a terminal, which asks for them")


def config_dirs() -> list[Path]:
    """Where the kaggle client itself looks for kaggle.json."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.home() / ".kaggle", xdg / "kaggle"]


def read_kaggle_json(path: Path, source: str) -> Credentials:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Windows editors may start it with a BOM
        username, key = data["username"], data["key"]
    except (OSError, ValueError, TypeError, KeyError):
        raise CredentialsError(f"{path} is not a kaggle.json: it must be JSON like "
                               f'{{"username": "you", "key": "..."}}; download a fresh one from {API_PAGE}') from None
    for name, value in (("username", username), ("key", key)):
        if not isinstance(value, str) or not value.strip():  # else str() would make a key of "None"
            got = "null" if value is None else "an empty string" if isinstance(value, str) else type(value).__name__
            raise CredentialsError(f"{path}: \"{name}\" must be a non-empty string, got {got}; download a fresh "
                                   f"kaggle.json from {API_PAGE}")
    username, key = username.strip(), key.strip()
    if path.stat().st_mode & 0o077:
        print(f"note: {path} is readable by other users of this machine; `chmod 600 {path}` keeps the key private")
    return Credentials(source, username, key)


def ask_credentials(ask, ask_secret, repo_dir: Path) -> Credentials:
    """Username and key from the person at the terminal; the key is read without echo. Offers to save them."""
    print(f"No Kaggle credentials found{half_set()}. Create an API key at {API_PAGE} (\"Create New Token\"), "
          f"then enter it here.")
    try:
        username = ask("Kaggle username: ").strip()
        key = ask_secret("Kaggle key (hidden): ").strip()
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at a prompt: the other ways in, not a traceback
        print()
        raise CredentialsError(no_credentials_message(repo_dir, "none typed")) from None
    if not username or not key:
        raise CredentialsError("a Kaggle username and key are both needed")
    target = config_dirs()[0] / "kaggle.json"
    if ask(f"Save them to {target} (readable only by you) so you are not asked again? [Y/n] ").strip().lower() \
            in ("", "y", "yes"):
        save_kaggle_json(target, username, key)
        print(f"saved {target} (mode 0600)")
    return Credentials("typed at the terminal", username, key)


def save_kaggle_json(path: Path, username: str, key: str) -> None:
    """Write kaggle.json readable by its owner only: created with mode 0600, never world-readable for a moment."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": username, "key": key}, f)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def resolve_credentials(kaggle_json=None, repo_dir=None, interactive: bool | None = None, ask=input,
                        ask_secret=getpass.getpass) -> Credentials:
    """The first credentials found, in the order of the module docstring. repo_dir defaults to the repo folder;
    interactive to whether stdin is a terminal."""
    repo_dir = Path(repo_dir or REPO_DIR)
    if kaggle_json:
        path = Path(kaggle_json).expanduser()
        if path.is_dir() and (path / "kaggle.json").is_file():  # the folder that holds it
            path = path / "kaggle.json"
        elif path.is_dir():
            raise CredentialsError(f"--kaggle-json {path} is a folder without a kaggle.json; name the file itself")
        if not path.is_file():
            raise CredentialsError(f"--kaggle-json {path}: no such file")
        return read_kaggle_json(path, f"--kaggle-json {path}")
    if (repo_dir / "kaggle.json").is_file():
        return read_kaggle_json(repo_dir / "kaggle.json", f"{repo_dir / 'kaggle.json'} (the repo folder)")
    if os.environ.get("KAGGLE_USERNAME", "").strip() and os.environ.get("KAGGLE_KEY", "").strip():
        return Credentials("the KAGGLE_USERNAME and KAGGLE_KEY environment variables",
                           os.environ["KAGGLE_USERNAME"].strip(), os.environ["KAGGLE_KEY"].strip())
    for folder in config_dirs():
        if (folder / "kaggle.json").is_file():
            return read_kaggle_json(folder / "kaggle.json", str(folder / "kaggle.json"))
    env_token = os.environ.get("KAGGLE_API_TOKEN", "").strip()  # the token itself, or a file holding it
    if env_token and not os.path.isfile(env_token):
        return Credentials("the KAGGLE_API_TOKEN environment variable", token=env_token)
    for path in ([Path(env_token)] if env_token else []) + [Path.home() / ".kaggle" / "access_token"]:
        if path.is_file() and path.read_text().strip():
            return Credentials(f"the API token in {path}", token=path.read_text().strip())
    if sys.stdin.isatty() if interactive is None else interactive:
        return ask_credentials(ask, ask_secret, repo_dir)
    raise CredentialsError(no_credentials_message(repo_dir))


@contextlib.contextmanager
def environment(values: dict):
    """Set environment variables for the duration of a block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def kaggle_api(creds: Credentials):
    """An authenticated `kaggle.KaggleApi` for these credentials.

    `import kaggle` authenticates at import time (kaggle 1.x and 2.x), printing help or exiting when it finds
    nothing, so it is imported only here, with the chosen credentials in the environment (kaggle reads them from
    there) for just this block, its chatter swallowed, and any failure turned into one CredentialsError. Note that
    kaggle 2.x itself prefers an access token over a key when it finds both."""
    names = {"KAGGLE_USERNAME": creds.username, "KAGGLE_KEY": creds.key} if creds.key else \
        {"KAGGLE_API_TOKEN": creds.token}
    try:
        with environment(names), contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except ImportError as e:
        raise CredentialsError(f"the kaggle package cannot be imported ({e}); `pip install -r requirements.txt` "
                               f"installs it (kaggle 2.x also needs `six`)") from None
    except (Exception, SystemExit) as e:
        if unreachable(e):  # kaggle 2.x checks an access token with Kaggle's servers
            raise CredentialsError(f"could not reach Kaggle to check the credentials from {creds.source} "
                                   f"({type(e).__name__}: {e}); check your connection or proxy") from None
        raise CredentialsError(f"Kaggle did not accept the credentials from {creds.source} "
                               f"({type(e).__name__}); check them at {API_PAGE}") from None
    return api


def unreachable(error: BaseException | None) -> bool:
    """Whether an error, or one it came from, is the network failing (no route, DNS, proxy, timeout) rather than a
    refusal: requests' connection errors and timeouts, and the OS's own."""
    import requests  # a dependency of kaggle

    network = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError,
               socket.gaierror)
    while error is not None:
        if isinstance(error, network):
            return True
        error = error.__cause__ or error.__context__
    return False
