"""What trainings and predictions leave on disk, through Cog's real servers, each with a
TMPDIR of its own: after successful, failed and canceled requests, TMPDIR holds the last
successful training's archive (Cog reads it after train() returns) and the adapters the
predictor keeps loaded, within its cache's limit, and nothing else of the project's."""

import contextlib
import http.server
import os
import shutil
import time
from pathlib import Path

from src.adapters import STORE_PREFIX
from src.serving.chat import MAX_LOADED_ADAPTERS
from src.training.outputs import OUTPUT_PREFIX, remove_cog_leftovers
from tests.helpers import FACTS, FAST_LEARNING, loopback_server, serve_directory, wait_for
from tools.cog_server import cog_server

PROJECT = Path(__file__).resolve().parent.parent


def project_files(tmp: Path) -> list[str]:
    """What is in TMPDIR but the files of the libraries' own processes (wandb, torch's
    compile workers: none run here) and Cog's server (sockets)."""
    return sorted(p.name for p in tmp.iterdir() if not p.is_socket())


@contextlib.contextmanager
def cut_short_download():
    """An http URL that promises 100 KB and sends 10 before closing: Cog's own download of
    a Path input fails and leaves its partial file."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"text": "')
            self.wfile.flush()
            self.connection.close()

        def log_message(self, *args: object) -> None:
            pass

    with loopback_server(Handler) as url:
        yield f"{url}/data.jsonl"


def test_trainings_leave_the_last_archive_only(tiny_model_dir, facts_file, tmp_path, webhook):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"BASE_MODEL": str(tiny_model_dir), "TMPDIR": str(tmp)}
    good = {"train_data": str(facts_file), **FAST_LEARNING, "num_train_epochs": 1}
    with cog_server(PROJECT, "train", env) as server, cut_short_download() as short:
        assert server.post("/trainings", {"input": good}, timeout=300)[1]["status"] == "succeeded"
        first = project_files(tmp)
        assert len(first) == 1 and first[0].startswith(OUTPUT_PREFIX)
        failed = server.post("/trainings", {"input": {**good, "train_data": short}})[1]
        assert failed["status"] == "failed"
        server.wait_ready()
        partial = [p for p in tmp.iterdir() if p.name.endswith("data.jsonl")]
        assert partial, project_files(tmp)  # Cog's, before train() ran
        for path in partial:  # as if it had failed a while ago
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "p"}\n')
        assert (
            server.post("/trainings", {"input": {**good, "train_data": str(bad)}})[1]["status"]
            == "failed"
        )
        url, received = webhook
        body = {"input": {**good, "num_train_epochs": 1000}, "webhook": url}
        assert server.put("/trainings/c", body, {"Prefer": "respond-async"})[0] == 202
        wait_for(lambda: "step 1/4000 " in server.log_text(), timeout=120)  # this one
        assert server.post("/trainings/c/cancel") == (200, {})
        wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=20)
        server.wait_ready()
        assert server.post("/trainings", {"input": good}, timeout=300)[1]["status"] == "succeeded"
        last = project_files(tmp)
    assert len(last) == 1 and last[0].startswith(OUTPUT_PREFIX) and last != first
    assert [p.name for p in (tmp / last[0]).iterdir()] == ["training_output.tar"]


def test_predictions_keep_what_the_adapter_cache_holds(
    tiny_model_dir, facts_archive, other_facts_archive, tmp_path
):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    served = tmp_path / "served"
    served.mkdir()
    for number in range(MAX_LOADED_ADAPTERS + 2):
        shutil.copy(other_facts_archive, served / f"other{number}.tar")
    (served / "broken.tar").write_bytes(b"not a tar at all" * 100)
    env = {"BASE_MODEL": str(tiny_model_dir), "COG_WEIGHTS": str(facts_archive), "TMPDIR": str(tmp)}
    question = {"prompt": FACTS[0][0], "max_new_tokens": 4, "temperature": 0.01, "seed": 0}
    with serve_directory(served) as (url, _), cog_server(PROJECT, "predict", env) as server:
        for number in range(MAX_LOADED_ADAPTERS + 2):
            weights = f"{url}/other{number}.tar"
            events = server.stream_prediction({**question, "replicate_weights": weights})
            assert events[-1].data["status"] == "succeeded"
        broken = server.stream_prediction({**question, "replicate_weights": f"{url}/broken.tar"})
        assert broken[-1].data["status"] == "failed"
        (store,) = [p for p in tmp.iterdir() if p.name.startswith(STORE_PREFIX)]
        unpacked = list(store.iterdir())
    assert project_files(tmp) == [store.name]
    assert len(unpacked) == MAX_LOADED_ADAPTERS  # the setup weights and the 3 latest
    assert all((folder / ".complete").is_file() for folder in unpacked)


def test_only_cog_s_partial_data_downloads_are_removed(tmp_path):
    """Old, closed, not this training's input, and a data file's name: a developer's shared
    /tmp keeps other programs' temporary files."""

    def made(name: str, age_s: float = 3600) -> Path:
        path = tmp_path / name
        path.write_bytes(b"{}")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    partial, other = made("tmpab12cd_9data.jsonl"), made("tmpab12cd_9notes.bin")
    young, kept = made("tmpzz12cd_9young.jsonl", age_s=5), made("tmpqq12cd_9input.json")
    held = made("tmpop12cd_9open.txt")
    with held.open("rb"):
        remove_cog_leftovers(tmp_path, {kept.resolve()})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (other, young, kept, held)
    )
    assert not partial.exists()
