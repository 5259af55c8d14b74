"""The Hub side of sharing a head: finding its files in a local folder, the Hub or its cache, and pushing
a folder in one commit.

Works on paths and a `write(folder)` callable only; what the files mean is `ocd_hf.serialization`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from .constants import CONFIG_NAME, HEAD_NAME, LIBRARY_NAME, STATE_NAME
from .serialization import recover_folder, refuse_pickles
from .version import __version__

DEFAULT_COMMIT_MESSAGE = "Upload OCD head"


@dataclass(frozen=True)
class HeadFiles:
    """Local paths of one head's files.

    Args:
        config: `ocd_config.json`.
        state: `ocd_state.json`; None for a head saved by ocd_hf 0.1, which kept everything in the config.
        head: `ocd_head.safetensors`.
        where: The source as the user named it, for messages.
    """

    config: Path
    state: Path | None
    head: Path
    where: str


def resolve_head_files(
    pretrained_head: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> HeadFiles:
    """A head's files from a local folder, else from the Hub or its cache (same arguments as `hf_hub_download`).

    A local folder wins over a Hub id of the same name. A source that cannot be a Hub id ("owner/name":
    at most one "/", no leading "." or "/", no "..") is only looked up locally, so a mistyped path fails
    at once, without network access. A `subfolder` may not leave the head folder.
    """
    source = os.fspath(pretrained_head)
    check_subfolder(subfolder)
    if not os.path.isdir(source):
        recover_folder(source)  # a save killed between its two renames: put the head back (with a warning)
    if os.path.isdir(source):
        folder = Path(source, subfolder) if subfolder else Path(source)
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if HEAD_NAME not in files:
            refuse_pickles(files, str(folder))
            raise FileNotFoundError(f"{folder} has no {HEAD_NAME}; it is not a saved OCD head (files: {files[:10]}).")
        if CONFIG_NAME not in files:
            raise FileNotFoundError(
                f"{folder} has {HEAD_NAME} but no {CONFIG_NAME}; the head cannot be rebuilt without it."
            )
        state = folder / STATE_NAME if STATE_NAME in files else None
        return HeadFiles(folder / CONFIG_NAME, state, folder / HEAD_NAME, str(folder))

    if os.path.exists(source):
        raise FileNotFoundError(f"{source!r} is a file; pass the folder that holds {CONFIG_NAME} and {HEAD_NAME}.")
    if not looks_like_repo_id(source):
        raise FileNotFoundError(
            f"No local folder {source!r} exists (looked for {os.path.abspath(source)}), and {source!r} is neither "
            "a local folder nor a valid Hub repo id ('owner/name'). Check the path."
        )
    where = where_of(source, revision, subfolder)
    # Said in every Hub error: the user may have meant a local folder of that name.
    not_local = f" (No local folder {os.path.abspath(source)} exists either.)"
    kwargs = dict(
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        library_name=LIBRARY_NAME,
        library_version=__version__,
    )
    offline = hf_constants.HF_HUB_OFFLINE or local_files_only

    def fetch(filename: str, known: list[str]) -> str:
        try:
            return hf_hub_download(source, filename, **kwargs)
        except HFValidationError as e:
            raise FileNotFoundError(
                f"{source!r} is neither a local folder nor a valid Hub repo id ({e}).{not_local}"
            ) from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{where} is not a Hub repo you can access (missing, private or gated: pass token=).{not_local}"
            ) from None
        except LocalEntryNotFoundError as e:
            refuse_pickles(known + ([] if offline else _hub_listing(source, revision, subfolder, token)), where)
            raise FileNotFoundError(
                f"{filename} of {where} is not in the Hub cache ({cache_dir or hf_constants.HF_HUB_CACHE}) and "
                + (
                    "offline mode is on (HF_HUB_OFFLINE / local_files_only). "
                    if offline
                    else "the Hub could not be reached. "
                )
                + "Download it once while online, or pass a local folder."
                + not_local
            ) from e
        except EntryNotFoundError:
            refuse_pickles(known + _hub_listing(source, revision, subfolder, token), where)
            raise FileNotFoundError(f"{where} has no {filename}; it is not a saved OCD head.{not_local}") from None

    config_path = Path(fetch(CONFIG_NAME, []))
    # Files of this snapshot already in the cache: the only listing available offline.
    cached = sorted(p.name for p in config_path.parent.iterdir())
    head_path = Path(fetch(HEAD_NAME, cached))
    state_path = _fetch_state(source, kwargs, config_path, offline, revision, subfolder, token)
    return HeadFiles(config_path, state_path, head_path, where)


_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]{0,95}$", re.ASCII)


def looks_like_repo_id(source: str) -> bool:
    """Whether `source` has the form of a Hub repo id ("name" or "owner/name"); paths such as "./head",
    "/abs/head", "a/b/c" or "..\\head" do not."""
    return bool(_REPO_ID.match(source)) and ".." not in source and "--" not in source and not source.endswith(".")


def check_subfolder(subfolder: str | None) -> None:
    """Refuse a subfolder that is absolute or climbs out of the head folder with ".."."""
    if subfolder is None:
        return
    parts = re.split(r"[\\/]", subfolder)
    if os.path.isabs(subfolder) or subfolder.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(
            f"subfolder={subfolder!r} leaves the head folder; give a path inside it (no '..', not absolute)."
        )


def _fetch_state(source, kwargs, config_path: Path, offline: bool, revision, subfolder, token) -> Path | None:
    """`ocd_state.json`, or None for a 0.1 head (its flat config holds the shapes and never had a state file)."""
    if "weight_shape" in json.loads(config_path.read_text(encoding="utf-8")):
        return None
    try:
        return Path(hf_hub_download(source, STATE_NAME, **kwargs))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        raise FileNotFoundError(
            f"{where_of(source, revision, subfolder)} has {CONFIG_NAME} but no {STATE_NAME}"
            + (" in the Hub cache (offline mode is on)" if offline else "")
            + "; download the whole head once while online, or pass a local folder."
        ) from None


def where_of(source: str, revision: str | None, subfolder: str | None) -> str:
    return source + (f"@{revision}" if revision else "") + (f" (subfolder {subfolder})" if subfolder else "")


def _hub_listing(repo_id: str, revision: str | None, subfolder: str | None, token: str | bool | None) -> list[str]:
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # offline, missing repo, no permission: the listing is only used to explain an error
        return []
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [f[len(prefix) :] for f in files if f.startswith(prefix)]


def push_folder(
    repo_id: str,
    write: Callable[[Path], object],
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Create the repo (and branch `revision`) if needed, let `write(folder)` fill a temporary folder, and
    upload it in one commit. Returns the commit URL, or the pull request's URL with `create_pr=True`."""
    if create_pr and revision not in (None, hf_constants.DEFAULT_REVISION):
        raise ValueError("create_pr=True opens a pull request against main; leave revision unset.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, hf_constants.DEFAULT_REVISION):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ocd-push-") as tmp:
        folder = Path(tmp) / "head"
        write(folder)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=revision,
            create_pr=create_pr,
        )
    return info.pr_url if create_pr and info.pr_url else info.commit_url
