"""The model's thread: jobs run on it one after another (results and errors come back to the
caller), the decode loop after them; CPU threads give their OpenMP workers back."""

import threading

import pytest

from src.serving.model_thread import ModelThread, release_openmp_team


def test_jobs_run_on_the_model_thread_and_their_errors_come_back():
    thread = ModelThread("test-model")
    assert thread.run(threading.current_thread) is thread.thread
    with pytest.raises(ValueError, match="bad job"):
        thread.run(lambda: (_ for _ in ()).throw(ValueError("bad job")))
    assert thread.run(lambda: thread.run(lambda: 7)) == 7  # from the thread itself: inline
    looping = threading.Event()
    thread.start(lambda: (looping.set(), threading.Event().wait()))
    assert looping.wait(10)


def test_a_thread_gives_its_openmp_workers_back():
    """torch's CPU build runs on OpenMP 5 (libgomp on Linux): the call is found and works."""
    import torch

    done = []

    def work():
        (torch.randn(200_000) * 2).sum()  # parallel work: a team for this thread
        done.append(release_openmp_team())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert done == [True]


def test_the_chat_model_is_loaded_on_the_thread_that_decodes(base_model_env, facts_archive):
    from src.serving.chat import ChatModel

    chat = ChatModel(str(facts_archive))
    assert chat.scheduler.model_thread is chat.model_thread
    assert chat.model_thread.thread.name == "model"
