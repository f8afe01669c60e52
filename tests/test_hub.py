"""cli.hub: a name is a local path or a hub id, loaded from the cache when the hub cannot be asked, and every failure
is one line naming the flag."""

import huggingface_hub
import pytest

from ipu_trainer.cli import hub


def test_a_cached_hub_id_still_loads_when_the_hub_cannot_be_asked(tmp_path, offline):
    """Offline is not an error for what the cache holds: load_local_or_hub asks for the cached copy."""
    asked = []

    def load(local_only):
        asked.append(local_only)
        return "config"

    assert hub.load_local_or_hub("--config_name", "bert-base-uncased", load) == "config"
    assert asked == [True]


def test_a_hub_id_the_reachable_hub_does_not_know_is_one_line(monkeypatch):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(hub, "hub_usable", lambda: True)

    def load(local_only):
        assert not local_only
        response = httpx2.Response(404, request=httpx2.Request("HEAD", "https://huggingface.co/someone/nothing"))
        try:
            raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found", response=response)
        except RepositoryNotFoundError as error:  # as transformers re-raises it
            raise OSError("someone/nothing is not a local folder and is not a valid model identifier\n...") from error

    with pytest.raises(hub.HubError, match=r"^--config_name someone/nothing: not a local folder, and no such "
                                           r"repository on the hub \(if it is private, log in"):
        hub.load_local_or_hub("--config_name", "someone/nothing", load)


def test_push_to_hub_without_a_login_is_refused_before_training(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="--push_to_hub needs a hub login: run hf auth login"):
        hub.check_push_to_hub(SimpleNamespace(push_to_hub=True, hub_token=None))
    hub.check_push_to_hub(SimpleNamespace(push_to_hub=True, hub_token="hf_x"))
    hub.check_push_to_hub(SimpleNamespace(push_to_hub=False, hub_token=None))
