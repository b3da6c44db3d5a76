"""The model's thread: jobs run on it one after another (results and errors come back to the
caller), the decode loop after them, and jobs handed to it while the loop runs run between
the loop's steps."""

import queue
import threading

import pytest

from src.serving.model_thread import ModelThread


def test_jobs_run_on_the_model_thread_and_their_errors_come_back():
    thread = ModelThread("test-model")
    assert thread.run(threading.current_thread) is thread.thread
    with pytest.raises(ValueError, match="bad job"):
        thread.run(lambda: (_ for _ in ()).throw(ValueError("bad job")))
    assert thread.run(lambda: thread.run(lambda: 7)) == 7  # from the thread itself: inline


def test_jobs_run_between_the_loop_s_steps_and_wake_it():
    thread = ModelThread("test-loop")
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    steps = []

    def loop() -> None:  # as the scheduler's: waits for work, idle, until woken
        while True:
            thread.run_pending()
            inbox.get()
            steps.append(threading.current_thread())

    thread.start(loop, wake=lambda: inbox.put(None))
    assert thread.run(threading.current_thread) is thread.thread  # while the loop idles
    with pytest.raises(KeyError):
        thread.run(lambda: {}["missing"])
    assert steps and set(steps) == {thread.thread}


def test_the_chat_model_is_loaded_on_the_thread_that_decodes(base_model_env, facts_archive):
    from src.serving.chat import ChatModel

    chat = ChatModel(str(facts_archive))
    assert chat.scheduler.model_thread is chat.model_thread
    assert chat.model_thread.thread.name == "model"
    assert chat.model_thread.run(threading.current_thread) is chat.model_thread.thread
