"""Export a trained generator as a Hub folder that `snac.SNAC.from_pretrained` loads, and push it.

A folder holds `config.json` (exactly `snac.SNAC`'s constructor arguments), `model.safetensors`,
`pytorch_model.bin` (the file `snac.SNAC.from_pretrained` reads) and a `README.md` model card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from safetensors.torch import save_file

from .model import SnacGenerator, generator_from_pretrained

logger = get_logger(__name__)


def save_pretrained(model: SnacGenerator, folder: str | os.PathLike, card: Optional[str] = None) -> Path:
    """Write config.json, model.safetensors and pytorch_model.bin (plus README.md when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    torch.save(state, folder / "pytorch_model.bin")
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def load_codec(path_or_repo: str, device: str | torch.device = "cpu") -> SnacGenerator:
    """Load one of our folders (safetensors first) or any released SNAC folder / Hub id, in eval mode."""
    return generator_from_pretrained(path_or_repo).to(device).eval()


def model_card(model: SnacGenerator, info: dict[str, Any]) -> str:
    """A model card with YAML metadata so the Hub lists the codec under `library_name: snac`."""
    config = model.config
    hop = int(model.hop_length)
    rates = [config["sampling_rate"] / hop / stride for stride in config["vq_strides"]]
    bits = (config["codebook_size"] - 1).bit_length()
    bitrate = sum(rates) * bits
    n_params = sum(p.numel() for p in model.parameters())
    datasets_yaml = "".join(f"- {d}\n" for d in info.get("datasets", []) if d)
    metrics = info.get("metrics") or {}
    metric_rows = "".join(f"| {k} | {v:.4f} |\n" for k, v in metrics.items())
    return (
        "---\nlibrary_name: snac\nlicense: mit\ntags:\n- audio\n- audio-codec\n- snac\n- snac-accel\n"
        + (f"datasets:\n{datasets_yaml}" if datasets_yaml else "")
        + "---\n\n"
        + f"# {info.get('name', 'SNAC codec')}\n\n"
        + "A Multi-Scale Neural Audio Codec (SNAC) trained with snac-accel.\n\n"
        + f"- Sample rate: {config['sampling_rate']} Hz\n"
        + f"- Levels: {len(config['vq_strides'])}, token rates {', '.join(f'{r:.2f}' for r in rates)} Hz\n"
        + f"- Codebook size: {config['codebook_size']} ({bits} bits), bitrate {bitrate / 1000:.2f} kbps\n"
        + f"- Parameters: {n_params / 1e6:.2f}M\n"
        + f"- Training steps: {info.get('steps', 'unknown')}\n"
        + (f"\n## Validation\n\n| metric | value |\n| --- | --- |\n{metric_rows}" if metric_rows else "")
        + "\n## Usage\n\n```python\nimport torch\nfrom snac import SNAC\n\n"
        + f"model = SNAC.from_pretrained(\"{info.get('repo_id', 'PATH_OR_REPO')}\").eval()\n"
        + f"audio = torch.randn(1, 1, {config['sampling_rate']})  # [batch, 1, samples]\n"
        + "with torch.inference_mode():\n    codes = model.encode(audio)\n    audio_hat = model.decode(codes)\n```\n"
    )


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, commit_message: str = "Upload SNAC codec") -> str:
    """Create the repo if needed and upload only the export folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PermissionError(f"no Hugging Face token: run `hf auth login` or set HF_TOKEN; "
                              f"the export stays in {folder}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message)
    logger.info(f"pushed {folder} to {repo_id}")
    return str(getattr(commit, "commit_url", commit))
