"""Local directories or Hugging Face repos, with one clear line when the hub cannot be reached."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

from .errors import HubError


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
    return download(str(path_or_repo), [*DEFAULT_ALLOW_PATTERNS, *extra_patterns], revision)
