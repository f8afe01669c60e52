"""Loading by name: a local folder, else a Hugging Face hub id, with one clear line when neither works.

The hub libraries retry an unreachable hub five times with back-off (about 25 s) before failing with a
long traceback whose message blames the network even for a mistyped local path. Here a name is sorted
out before anything is downloaded:

- an existing path is loaded as it is;
- a name that cannot be a hub id (an absolute path, two or more "/", ...) is a missing local folder;
- a hub id is loaded from the cache only (no request at all) when `HF_HUB_OFFLINE=1` is set or when one
  quick request shows the hub cannot be reached, so an unreachable hub costs one connection attempt.

Failures become a `HubError` (an OSError) or a FileNotFoundError with one line naming the flag, the
name and the fix.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, TypeVar

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session, validate_repo_id

from ..training.run_control import one_line

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Outcome of the reachability request, per hub endpoint: one request per process.
_reachability: dict[str, Optional[str]] = {}


class HubError(OSError):
    """A name that is neither a usable local path nor loadable from the hub; the message is one line."""


def hub_token(model_args: Any) -> Optional[str | bool]:
    """The token for hub requests from the scripts' model arguments: --token, else True (the saved login) with
    --use_auth_token, else None (the hub libraries' default)."""
    token = getattr(model_args, "token", None)
    return token or (True if getattr(model_args, "use_auth_token", False) else None)


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): the hub libraries make no requests at all."""
    return huggingface_hub.is_offline_mode()


def endpoint() -> str:
    return hub_constants.ENDPOINT


def unreachable_reason() -> Optional[str]:
    """None when the hub answers one HEAD request (any HTTP status), else why it could not be reached.

    One attempt with the hub's own metadata timeout (HF_HUB_ETAG_TIMEOUT), remembered for the process.
    """
    url = endpoint()
    if url not in _reachability:
        try:
            get_session().head(url, timeout=hub_constants.HF_HUB_ETAG_TIMEOUT)
            _reachability[url] = None
        except Exception as error:  # the HTTP client's transport errors (DNS, refused, timeout, TLS, proxy)
            _reachability[url] = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _reachability[url]


def hub_usable() -> bool:
    """The hub may be asked: not offline and reachable."""
    return not is_offline() and unreachable_reason() is None


def could_be_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repo id ("name" or "namespace/name")."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def not_reachable_line(flag: str, name: str, what: str = "folder", repo_type: str = "model") -> str:
    """The one line for a hub id that is not in the cache while the hub cannot be asked."""
    download = f"hf download {name}" + (f" --repo-type {repo_type}" if repo_type != "model" else "")
    local = "a local folder of data files" if repo_type == "dataset" else f"a local {what} (written by save_pretrained)"
    fix = f"point {flag} at {local} instead, or download it where the hub can be reached ({download})"
    if is_offline():
        return f"{flag} {name}: not a local {what}, and not in the hub cache; HF_HUB_OFFLINE=1 is set, so the hub was not asked: {fix}"
    return (f"{flag} {name}: not a local {what}, and the hub ({endpoint()}) could not be reached "
            f"({unreachable_reason()}): {fix}; set HF_HUB_OFFLINE=1 to use the hub cache without asking the hub")


def load_local_or_hub(
    flag: str, name: str, load: Callable[[bool], T], what: str = "folder", example: str = "bert-base-uncased"
) -> T:
    """`load(local_files_only)` for `name`, given on the command line as `flag`, with one-line errors.

    `load` is e.g. `lambda local_only: AutoConfig.from_pretrained(name, local_files_only=local_only)`. It is
    called with local_files_only=True for a hub id when the hub cannot be asked, so a cached copy is still used.
    """
    if os.path.exists(os.path.expanduser(name)):
        try:
            return load(False)
        except OSError as error:
            raise HubError(f"{flag} {name}: {_first_line(error)}") from None
        except ValueError as error:  # e.g. a config.json that is not JSON, or names no model type
            raise ValueError(f"{flag} {name}: {one_line(error)}") from None
    if not could_be_hub_id(name):
        raise FileNotFoundError(
            f"{flag} {name}: no such {what} (give a {what} written by save_pretrained, or a hub id such as {example})"
        )
    local_only = not hub_usable()
    try:
        result = load(local_only)
    except OSError as error:
        raise HubError(_hub_failure_line(flag, name, error, local_only, what)) from None
    except ValueError as error:
        raise ValueError(f"{flag} {name}: {one_line(error)}") from None
    if local_only:
        logger.info("%s %s: loaded from the hub cache (the hub was not asked).", flag, name)
    return result


def _hub_failure_line(flag: str, name: str, error: BaseException, local_only: bool, what: str) -> str:
    if local_only:
        return not_reachable_line(flag, name, what)
    causes = error_chain(error)
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        return (f"{flag} {name}: a gated repository on the hub: ask for access on its page, then log in "
                "(hf auth login) and pass --use_auth_token")
    if any(isinstance(cause, RevisionNotFoundError) for cause in causes):
        return f"{flag} {name}: the hub repository has no such revision (--model_revision)"
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return (f"{flag} {name}: not a local {what}, and no such repository on the hub (if it is private, log in "
                "with hf auth login and pass --use_auth_token)")
    return f"{flag} {name}: {_first_line(error)}"


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or while handling, outermost first (at most ten)."""
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_push_to_hub(args: Any) -> None:
    """--push_to_hub uploads after training: refuse it before training when the upload cannot happen."""
    if not getattr(args, "push_to_hub", False):
        return
    if is_offline():
        raise HubError("--push_to_hub needs the hub, but HF_HUB_OFFLINE=1 is set: unset it, or drop --push_to_hub "
                       "and upload the output folder later (hf upload)")
    reason = unreachable_reason()
    if reason is not None:
        raise HubError(f"--push_to_hub: the hub ({endpoint()}) could not be reached ({reason}): drop --push_to_hub "
                       "and upload the output folder later (hf upload), or fix the connection")
    if not getattr(args, "hub_token", None) and huggingface_hub.get_token() is None:
        raise HubError("--push_to_hub needs a hub login: run hf auth login (or set HF_TOKEN, or pass --hub_token)")
