"""`_shell.call` holds one lock per cached model, so two browser sessions never compute on the
shared model at once (steering hooks of one would leak into the other's forward passes)."""
from __future__ import annotations

import threading

import torch


def test_model_lock_is_per_model_and_held_by_call(monkeypatch):
    import streamlit as st

    from lenslab.app import _shell

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert _shell.model_lock(a) is _shell.model_lock(a) and _shell.model_lock(a) is not _shell.model_lock(b)
    monkeypatch.setattr(st, "session_state", {_shell._CTX: _shell.Context(name="m", model=a, prompt="p")})
    monkeypatch.setattr(st, "spinner", lambda *_a, **_k: __import__("contextlib").nullcontext())

    def other_thread_can_take(model) -> bool:
        got = []

        def try_lock() -> None:
            lock = _shell.model_lock(model)
            got.append(lock.acquire(blocking=False))
            if got[0]:
                lock.release()

        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        return got[0]

    assert _shell.call("x", other_thread_can_take, a) is False  # held while fn runs
    assert _shell.call("x", other_thread_can_take, b) is True   # another model is free
    assert other_thread_can_take(a) is True                     # released afterwards
    assert _shell.call("x", lambda: _shell.call("y", lambda: 7)) == 7  # re-entrant (nested calls)
