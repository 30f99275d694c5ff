"""The CLI's settings: `$XDG_CONFIG_HOME/progress/config.json` (mode 600), overridden by
PROGRESS_URL, PROGRESS_API_KEY and PROGRESS_TOKEN, overridden by command-line flags."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """Where `progress login` keeps its settings (the XDG base directory rule)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "progress" / "config.json"


@dataclass
class Settings:
    """What the CLI needs: the server, and a credential for it.

    `api_key` is used for task commands; `token` (the login token) for managing keys,
    which an API key cannot do.
    """

    url: str | None = None
    token: str | None = None
    api_key: str | None = None
    #: The id of the key `progress login` made for this machine (revoked by logout).
    api_key_id: str | None = None
    username: str | None = None


def load(path: Path) -> Settings:
    """The saved settings, or empty ones when there is no file yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"progress: cannot read {path}: {exc}") from None
    known = Settings.__dataclass_fields__
    return Settings(**{k: v for k, v in data.items() if k in known and isinstance(v, str)})


def save(path: Path, settings: Settings) -> None:
    """Write atomically, readable by the user alone (the file holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps({k: v for k, v in asdict(settings).items() if v is not None}, indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        # mkstemp creates the file with mode 600: the secret is never readable by others.
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def resolve(
    saved: Settings,
    env: Mapping[str, str],
    *,
    url: str | None = None,
    token: str | None = None,
    api_key: str | None = None,
) -> Settings:
    """Flags over environment over the saved file. A credential from a higher level
    replaces both saved ones (a PROGRESS_TOKEN must not be paired with a saved key)."""
    result = Settings(**asdict(saved))
    env_key = env.get("PROGRESS_API_KEY") or None
    env_token = env.get("PROGRESS_TOKEN") or None
    for level_key, level_token in ((env_key, env_token), (api_key, token)):
        if level_key or level_token:
            result.api_key, result.token = level_key, level_token
    result.url = url or env.get("PROGRESS_URL") or saved.url
    return result
