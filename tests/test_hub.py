"""cli.hub: a name is a local path or a hub id, loaded from the cache when the hub cannot be asked, and every failure
is one line naming the flag."""

from types import SimpleNamespace

import huggingface_hub
import pytest
from conftest import cache_hub_file

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


# ---- names, tokens and the one line -------------------------------------------------------------------------


def test_only_names_shaped_like_hub_ids_are_sent_to_the_hub():
    for name in ("bert-base-uncased", "Graphcore/bert-base-ipu", "user/model.v2"):
        assert hub.could_be_hub_id(name), name
    for name in ("/abs/path", "./model", "../model", "~/model", ".", "..", "a/b/c", "has space", ""):
        assert not hub.could_be_hub_id(name), name


def test_the_token_is_the_given_one_else_the_saved_login_when_asked():
    assert hub.hub_token(SimpleNamespace(token="hf_x", use_auth_token=True)) == "hf_x"
    assert hub.hub_token(SimpleNamespace(token=None, use_auth_token=True)) is True
    assert hub.hub_token(SimpleNamespace(token=None, use_auth_token=False)) is None
    assert hub.hub_token(SimpleNamespace()) is None


def test_a_local_folder_is_loaded_as_it_is_and_its_errors_name_the_flag(tmp_path):
    asked = []

    def load(local_only):
        asked.append(local_only)
        return "loaded"

    assert hub.load_local_or_hub("--config_name", str(tmp_path), load) == "loaded" and asked == [False]

    def broken(local_only):
        raise OSError("config.json is missing\nmore detail")

    with pytest.raises(hub.HubError, match=r"^--config_name .*: config.json is missing$"):
        hub.load_local_or_hub("--config_name", str(tmp_path), broken)

    def not_json(local_only):
        raise ValueError("not JSON:\nline 1")

    with pytest.raises(ValueError, match=r"^--config_name .*: not JSON: line 1$"):
        hub.load_local_or_hub("--config_name", str(tmp_path), not_json)
    with pytest.raises(FileNotFoundError, match=r"^--config_name /no/such/model: no such folder \(give a folder"):
        hub.load_local_or_hub("--config_name", "/no/such/model", load)


def test_a_hub_id_in_a_local_cache_loads_offline_and_one_not_cached_is_one_line(tmp_path, offline):
    from transformers import AutoConfig, BertConfig

    cache_hub_file(tmp_path / "cache", "someone/tiny-bert", "config.json", BertConfig(hidden_size=48).to_json_string())

    def load(name):
        return lambda local_only: AutoConfig.from_pretrained(name, cache_dir=str(tmp_path / "cache"),
                                                             local_files_only=local_only)

    assert hub.load_local_or_hub("--config_name", "someone/tiny-bert", load("someone/tiny-bert")).hidden_size == 48
    with pytest.raises(hub.HubError) as refused:
        hub.load_local_or_hub("--config_name", "someone/not-cached", load("someone/not-cached"))
    line = str(refused.value)
    assert line.startswith("--config_name someone/not-cached: not a local folder, and not in the hub cache; "
                           "HF_HUB_OFFLINE=1 is set, so the hub was not asked")
    assert "hf download someone/not-cached" in line and "\n" not in line


def test_an_unreachable_hub_is_asked_once_and_the_cache_used(tmp_path, unreachable):
    from transformers import AutoConfig, BertConfig

    cache_hub_file(tmp_path / "cache", "someone/tiny-bert", "config.json", BertConfig(hidden_size=48).to_json_string())
    asked = []

    def load(local_only):
        asked.append(local_only)
        return AutoConfig.from_pretrained("someone/tiny-bert", cache_dir=str(tmp_path / "cache"), local_files_only=local_only)

    assert hub.load_local_or_hub("--config_name", "someone/tiny-bert", load).hidden_size == 48
    assert asked == [True] and hub.unreachable_reason() is not None
    line = hub.not_reachable_line("--dataset_name", "someone/data", repo_type="dataset")
    assert "the hub (http://127.0.0.1:9) could not be reached" in line
    assert "hf download someone/data --repo-type dataset" in line and "set HF_HUB_OFFLINE=1" in line


def test_push_to_hub_is_refused_offline_or_unreachable(monkeypatch, offline):
    with pytest.raises(hub.HubError, match="--push_to_hub needs the hub, but HF_HUB_OFFLINE=1 is set"):
        hub.check_push_to_hub(SimpleNamespace(push_to_hub=True, hub_token="hf_x"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "connection refused")
    with pytest.raises(hub.HubError, match=r"--push_to_hub: the hub \(.*\) could not be reached \(connection refused\)"):
        hub.check_push_to_hub(SimpleNamespace(push_to_hub=True, hub_token="hf_x"))


def test_error_chain_follows_causes_and_contexts():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise OSError("middle") from inner
    except OSError:
        try:
            raise ValueError("outer")
        except ValueError as outer:
            chain = hub.error_chain(outer)
    assert [(type(error), error.args[0]) for error in chain] == [(ValueError, "outer"), (OSError, "middle"),
                                                                 (KeyError, "inner")]
