"""BASE_MODEL resolution: a local folder, an https tar archive (cached), a Hub repo id."""

import io
import tarfile

import pytest

from src.base_model import DEFAULT_BASE_MODEL, base_model_source, resolve_base_model
from src.errors import UserInputError
from tests.helpers import serve_directory


def test_default_is_llama_2_7b_chat(monkeypatch):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    assert base_model_source() == DEFAULT_BASE_MODEL == "meta-llama/Llama-2-7b-chat-hf"


def test_local_folder_is_used_in_place(tiny_model_dir):
    assert resolve_base_model(str(tiny_model_dir)).path == tiny_model_dir


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserInputError, match="BASE_MODEL: no such folder: /no/such/model"):
        resolve_base_model("/no/such/model")
    with pytest.raises(UserInputError, match=r"no config\.json"):
        resolve_base_model(str(tmp_path))


def test_archive_url_is_downloaded_once_into_the_cache(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "tiny.tar", "w") as tar:
        tar.add(tiny_model_dir, arcname="tiny-llama")
    with serve_directory(served) as (url, requested):
        first = resolve_base_model(f"{url}/tiny.tar?X-Amz-Signature=secret")
        second = resolve_base_model(f"{url}/tiny.tar?X-Amz-Signature=secret")
    assert requested == ["/tiny.tar?X-Amz-Signature=secret"]
    assert "secret" not in capsys.readouterr().out  # a presigned URL's signature is never logged
    assert first == second and first.path.name == "tiny-llama"
    assert (first.path / "config.json").read_bytes() == (
        tiny_model_dir / "config.json"
    ).read_bytes()


def test_unsafe_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "evil.tar", "w") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"bad"))
    with serve_directory(served) as (url, _), pytest.raises(UserInputError, match="unsafe path"):
        resolve_base_model(f"{url}/evil.tar")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    with (
        serve_directory(tmp_path) as (url, _),
        pytest.raises(
            UserInputError, match=r"BASE_MODEL: could not download .*/missing\.tar: HTTP Error 404"
        ),
    ):
        resolve_base_model(f"{url}/missing.tar")


def test_hub_repo_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="not in the cache and the Hub cannot be reached"):
        resolve_base_model("meta-llama/Llama-2-7b-chat-hf")


def test_outputs_name_a_url_base_without_its_credentials(tmp_path):
    from src.base_model import BaseModel

    signed = BaseModel(
        "https://user:secret@example.com:8443/m/llama.tar?X-Amz-Signature=abc#x", tmp_path
    )
    assert signed.public_name == "https://example.com:8443/m/llama.tar"
    assert BaseModel("meta-llama/Llama-2-7b-chat-hf", tmp_path).public_name == (
        "meta-llama/Llama-2-7b-chat-hf"
    )


def test_the_mounted_weights_come_first_then_the_hub(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A pushed model has the base mounted where cog.yaml's weights say: no token, no download."""
    import shutil

    import src.base_model

    mounted = tmp_path / "src" / "weights" / "llama-2-7b-chat"
    monkeypatch.setattr(src.base_model, "MANAGED_WEIGHTS", mounted)
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BASE_MODEL", raising=False)
    # Nothing mounted (a local run), or a mount without weights: the Hub (offline here).
    for partial in (None, "config.json"):
        if partial:
            mounted.mkdir(parents=True)
            shutil.copy(tiny_model_dir / partial, mounted / partial)
        with pytest.raises(UserInputError, match="not in the cache and the Hub cannot be"):
            resolve_base_model()
    shutil.rmtree(mounted)
    shutil.copytree(tiny_model_dir, mounted)
    base = resolve_base_model()
    assert base.path == mounted and base.source == DEFAULT_BASE_MODEL
    assert f"from the weights mounted at {mounted}" in capsys.readouterr().out
    # An explicit BASE_MODEL (here a folder) still wins.
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    assert resolve_base_model().path == tiny_model_dir
