"""Codec folders and the Hub: write one (`save_pretrained`), read any (`load_codec`), upload one (`push_to_hub`).

A folder holds `config.json` (exactly `snac.SNAC`'s constructor arguments), `model.safetensors` and
`pytorch_model.bin` (the file `snac.SNAC.from_pretrained` reads); `snac_accel.export` adds the model
card and its figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from accelerate.logging import get_logger
from safetensors.torch import save_file

from .checkpoints import model_from_checkpoint, resolve_checkpoint
from .model import SnacGenerator, generator_from_pretrained

logger = get_logger(__name__)

WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def ensure_accelerate_state() -> None:
    """accelerate's logger refuses to log before a state exists; entry points used outside a
    training run (scripts, notebooks) create the (idempotent, single-process) one here."""
    from accelerate import PartialState

    PartialState()


class ExportError(RuntimeError):
    """A folder is not an export folder (no weights to push)."""


class HubTokenError(PermissionError):
    """No Hugging Face token: the push cannot happen, the local export stays."""


def readable_by_all(path: Path) -> None:
    """Give a file the mode a plain write gets (0644 under the usual umask): safetensors writes 0600,
    which hides an export from the other users of a shared machine or serving account."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_pretrained(model: SnacGenerator, folder: str | os.PathLike, card: Optional[str] = None) -> Path:
    """Write config.json, model.safetensors and pytorch_model.bin (plus README.md when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    torch.save(state, folder / "pytorch_model.bin")
    readable_by_all(folder / "model.safetensors")
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def load_codec(path_or_repo: str, device: str | torch.device = "cpu", use_ema: bool = False) -> SnacGenerator:
    """Any codec, in eval mode: our export folders (safetensors first), a released SNAC folder or Hub
    id (config.json + pytorch_model.bin), or a training checkpoint / output folder of this project."""
    ensure_accelerate_state()
    path = Path(path_or_repo)
    if path.is_dir() and not (path / "config.json").is_file():
        model, _ = model_from_checkpoint(resolve_checkpoint(path), use_ema=use_ema)
    else:
        model = generator_from_pretrained(str(path_or_repo))
    return model.to(device).eval()


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, commit_message: str = "Upload SNAC codec") -> str:
    """Create the repo if needed and upload only the export folder; returns the commit URL.

    The token comes from the argument, HF_TOKEN or the login cache, goes only to `HfApi`, and is
    never logged or written.
    """
    from huggingface_hub import HfApi, get_token

    ensure_accelerate_state()
    folder = Path(folder)
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is not an export folder (missing {', '.join(missing)})")
    token = token or get_token()
    if not token:
        raise HubTokenError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again; "
                            f"the export stays in {folder}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message, ignore_patterns=[".*", "**/.*", "checkpoint*"])
    url = str(getattr(commit, "commit_url", None) or commit)
    logger.info(f"pushed {folder} to {repo_id}{f' ({revision})' if revision else ''}: {url}")
    return url
