"""Local directories or Hugging Face repos, with one clear line when the hub cannot be reached."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from .errors import HubError
from .files import read_regular

CARD_NAME = "README.md"
MAX_CARD_BYTES = 1 << 20  # a model card; its YAML front matter is capped lower
MAX_FRONT_MATTER = 64 << 10
MAX_YAML_DEPTH = 32


def download(repo_id: str, allow_patterns: Iterable[str], revision: Optional[str] = None) -> Path:
    """snapshot_download with huggingface-hub's progress bars; failures become one `HubError` line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns)))
    except HFValidationError:
        raise HubError(f"{repo_id!r} is neither a local directory nor a Hugging Face repo id") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms on the hub and log in "
                       "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repo on the Hugging Face hub (or it is private)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise HubError(f"cannot download {repo_id}: the Hugging Face hub is unreachable (offline?) "
                       "and no copy is cached locally") from None
    except OSError as exc:
        raise HubError(f"cannot download {repo_id}: {exc}".splitlines()[0]) from None


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def resolve_model_path(path_or_repo: str, revision: Optional[str] = None,
                       extra_patterns: Iterable[str] = ()) -> Path:
    """A local directory as is; otherwise the repo's files (weights, tokenizer, configs) downloaded."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{path} is a file, not a model directory")
        return path
    if looks_like_path(str(path_or_repo)):
        raise HubError(f"{path_or_repo}: no such directory")
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS  # (mlx-lm is heavy: only to download)

    return download(str(path_or_repo), [*DEFAULT_ALLOW_PATTERNS, *extra_patterns], revision)


def card_base_model(directory: str | Path) -> Optional[str]:
    """`base_model` from the model card (README.md front matter) in `directory`, or None.

    None when there is no card, no front matter or no base_model; a list names its first item.
    The card is parsed by huggingface_hub after cheap bounds (a regular file of at most 1 MB,
    front matter of at most 64 KB nested at most 32 deep). Raises HubError (one line) for a
    card that cannot be read or parsed, or a base_model that is not a non-empty string.
    """
    path = Path(directory) / CARD_NAME
    if not path.exists():
        return None
    text = read_regular(path, HubError, MAX_CARD_BYTES, "model card").decode("utf-8", "replace")
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    if len(front) > MAX_FRONT_MATTER or _yaml_depth(front) > MAX_YAML_DEPTH:
        raise HubError(f"{path}: the model card's front matter is too large or nested too "
                       "deeply to be a model card")
    from huggingface_hub import ModelCard

    try:
        base = ModelCard(text).data.base_model
    except Exception as exc:  # yaml and huggingface_hub raise many kinds on bad cards
        raise HubError(f"{path}: the model card's front matter cannot be read "
                       f"({type(exc).__name__})") from None
    if isinstance(base, list):
        base = base[0] if base else None
    if base is None:
        return None
    if not isinstance(base, str) or not base.strip():
        raise HubError(f"{path}: the model card's base_model is {_kind(base)}, not a model "
                       "repo id or path")
    return base.strip()


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "an empty string"
    return {bool: "a boolean", int: "a number", float: "a number", dict: "a mapping",
            list: "a nested list"}.get(type(value), f"a {type(value).__name__}")


def _yaml_depth(text: str) -> int:
    """An upper bound on how deep YAML `text` nests (brackets, and indentation in columns / 2)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    indent = max((len(line) - len(line.lstrip(" -")) for line in text.splitlines()), default=0)
    return max(deepest, indent // 2)
