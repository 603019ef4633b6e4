"""Publishing a finished folder to the Hugging Face hub: the checks before it, what is uploaded, the upload.

Any folder this toolkit writes with a model card (``README.md``) can be pushed: a fine-tuned
pipeline, a Social Reward checkpoint. Its files go up minus training state (:data:`STATE_DIRS`,
:data:`STATE_FILES`), in one commit. The token is ``HF_TOKEN`` or the user's hub login
(``huggingface_hub.get_token``) and is never printed. Every failure is a one-line
:class:`HubError` that says how to retry; nothing local is changed or deleted.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Mapping, Union

from .errors import UserError

logger = logging.getLogger(__name__)

# What a push leaves out, at any depth: folders (by name) and files (by name) of training state.
STATE_DIRS = (
    "checkpoint-*", "checkpoints",  # accelerate / trainer checkpoints (optimizer, scheduler, RNG states)
    "cache", "__pycache__",  # latent and text-embedding caches
    "logs", "wandb", "validation",  # tracker logs and validation samples of the run
    ".*",  # hidden: .tmp-checkpoint-*, .cache, half-written folders
)
STATE_FILES = (
    "optimizer*.bin", "optimizer*.pt", "optimizer*.pth", "optimizer*.safetensors",
    "scheduler.bin", "scheduler_*.bin", "scheduler*.pt", "lr_scheduler*",
    "random_states*", "rng_state*", "scaler.pt", "training_args.bin", "trainer_state.json",
    "*.pkl",  # accelerate's custom checkpoint state; never publish pickles
    "*.lock", "events.out.tfevents.*", ".*",
)
# The local card names the model by this path; a push puts the repo id in its place.
REPO_PLACEHOLDER = "path/to/this/folder"
# Licences of well-known bases, for when the base's own card is not at hand.
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2": "openrail++",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
}
_HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]+/?$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

Content = Union[bytes, Path]


class HubError(UserError):
    """A push that cannot start or did not finish."""


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a hub model id (huggingface_hub's own validator), or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def hub_id_of(model: str) -> str | None:
    """The hub id of a base model given as hub id or path: a local folder has none, except a
    snapshot in the hub cache (``.../models--org--name/snapshots/<sha>``)."""
    if Path(model).exists():
        found = _HF_CACHE_SNAPSHOT.search(Path(model).resolve().as_posix())
        return f"{found['org']}/{found['name']}" if found else None
    return model if repo_id_problem(model) is None else None


def base_license(model: str, revision: str | None = None) -> str | None:
    """The licence of a base model: from its card (a local folder's, or the hub cache's copy), else
    from :data:`KNOWN_LICENSES`; None when unknown. Never goes to the network."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    card = Path(model) / "README.md"
    repo_id = hub_id_of(model)
    if not card.is_file() and repo_id is not None:
        cached = try_to_load_from_cache(repo_id, "README.md", revision=revision)
        card = Path(cached) if isinstance(cached, str) else card
    if card.is_file():
        licence = (metadata_load(card) or {}).get("license")
        if licence:
            return str(licence)
    return KNOWN_LICENSES.get(repo_id or "")


def _offline_var() -> str | None:
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    return next((var for var in _OFFLINE_VARS if os.environ.get(var, "").upper() in ENV_VARS_TRUE_VALUES), None)


def check_hub_access(repo_id: str) -> str:
    """Everything a push needs that can be checked without the network: a well-formed repo id,
    the hub not switched off, a token. Returns the token."""
    from huggingface_hub import get_token

    problem = repo_id_problem(repo_id)
    if problem:
        raise HubError(f"'{repo_id}' is not a hub repo id: {problem}")
    offline = _offline_var()
    if offline:
        raise HubError(f"{offline}={os.environ[offline]} is set, so the hub is switched off for this process; unset it to push to {repo_id}")
    token = get_token()
    if not token:
        raise HubError(f"no hub token to push to {repo_id}: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or log in with `hf auth login`")
    return token


def plan_upload(folder: Path) -> tuple[list[str], list[str]]:
    """(files a push uploads, files it leaves out as training state), as sorted paths relative to ``folder``."""
    kept, left_out = [], []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        in_state_dir = any(fnmatch.fnmatch(part, pattern) for part in rel.parts[:-1] for pattern in STATE_DIRS)
        state_file = any(fnmatch.fnmatch(rel.name, pattern) for pattern in STATE_FILES)
        (left_out if in_state_dir or state_file else kept).append(rel.as_posix())
    return kept, left_out


def read_card(folder: Path) -> str:
    """The folder's model card; a folder without one is not something this toolkit wrote to be pushed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder")
    card = folder / "README.md"
    if not card.is_file():
        raise HubError(f"{folder} has no README.md model card; push a folder written by sr-finetune (a fine-tuned pipeline or a reward checkpoint)")
    return card.read_text(encoding="utf-8")


def push_command(folder: Path | str, repo_id: str, *, private: bool = True, revision: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """The ``sr-finetune push`` command line that uploads ``folder`` as asked (what a failed push tells the user to run)."""
    words = ["sr-finetune", "push", str(folder), "--repo", repo_id, *extra]
    words += [] if private else ["--public"]
    words += ["--revision", revision] if revision else []
    return shlex.join(words)


def _one_line(exc: Exception, token: str | None) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text.replace(token, "***") if token else text


def push_folder(
    folder: Path | str, repo_id: str, *, private: bool = True, revision: str | None = None, card: str | None = None,
    files: Mapping[str, Content] | None = None, token: str | None = None, retry: str | None = None,
) -> str:
    """Upload ``folder`` minus training state to ``repo_id`` in one commit; return the repo's URL.

    ``card`` replaces the folder's README.md (e.g. the card with an evaluation), ``files`` adds
    more (path in repo -> bytes or local file). ``retry`` is the command a failure names."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    card = read_card(folder) if card is None else card
    token = token or check_hub_access(repo_id)
    retry = retry or push_command(folder, repo_id, private=private, revision=revision)
    kept, left_out = plan_upload(folder)
    uploads: dict[str, Content] = {rel: folder / rel for rel in kept}
    uploads.update(files or {})
    uploads["README.md"] = card.replace(REPO_PLACEHOLDER, repo_id).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content if isinstance(content, bytes) else str(content)) for rel, content in sorted(uploads.items())]
    size = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in uploads.values())
    logger.info("push: %d files (%.1f MB) of %s to %s%s; %d files of training state stay local", len(operations), size / 1e6, folder, repo_id, f"@{revision}" if revision else "", len(left_out))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations, commit_message=f"Upload {folder.name} (sr-finetune)", repo_type="model", revision=revision)
    except Exception as exc:  # network, auth, quota: all end the same way, with the folder intact
        raise HubError(f"upload of {folder} to {repo_id} failed ({_one_line(exc, token)}); nothing local was changed, retry with: {retry}") from None
    return f"{url}/tree/{revision}" if revision else str(url)
