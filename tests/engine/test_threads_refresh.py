"""llmos's own choice of threads is looked at again before each generation (llmos/threads.py `refresh`)."""

from __future__ import annotations


def test_llmos_chosen_threads_follow_other_work_at_each_generation(monkeypatch, tiny_llama):
    """`refresh` (before each Generation) changes the count only where llmos chose it, at most once a second."""
    import torch

    from llmos import threads
    from llmos.engine.generate import Generation

    model = tiny_llama[1]
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "REFRESH_EVERY", 1.0)  # (the suite's fixture turns looking off)
    monkeypatch.setattr(threads, "auto_threads", lambda: 1)
    try:
        monkeypatch.setattr(threads, "_auto", False)
        torch.set_num_threads(2)
        list(Generation(model, [1, 2, 3], max_new_tokens=2).tokens())
        assert torch.get_num_threads() == 2  # the user's (or the CLI's --threads) count stands
        monkeypatch.setattr(threads, "_auto", True)
        monkeypatch.setattr(threads, "_refreshed", 0.0)
        list(Generation(model, [1, 2, 3], max_new_tokens=2).tokens())
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "auto_threads", lambda: 2)
        list(Generation(model, [1, 2, 3], max_new_tokens=2).tokens())
        assert torch.get_num_threads() == 1  # within the second: not looked at again
        monkeypatch.setattr(threads, "_refreshed", 0.0)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # sleeping workers: 2 would decode slower than 1
        list(Generation(model, [1, 2, 3], max_new_tokens=2).tokens())
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_WAIT_POLICY")
        monkeypatch.setattr(threads, "_refreshed", 0.0)
        list(Generation(model, [1, 2, 3], max_new_tokens=2).tokens())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_batch_engine_looks_before_its_steps(monkeypatch, tiny_llama):
    """The server's engine: a long-lived process started on an idle machine drops threads when other work starts."""
    import torch

    from llmos import threads
    from llmos.engine.batch import BatchEngine, Request

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "REFRESH_EVERY", 1.0)
    monkeypatch.setattr(threads, "_auto", True)
    monkeypatch.setattr(threads, "_refreshed", 0.0)
    monkeypatch.setattr(threads, "auto_threads", lambda: 1)
    try:
        torch.set_num_threads(2)
        engine = BatchEngine(tiny_llama[1], max_batch=2, max_len=32)
        engine.submit(Request([1, 2, 3], 2))
        engine.step()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
