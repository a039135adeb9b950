"""Fixtures that more than one test module uses."""

import pytest
import torch


@pytest.fixture
def one_thread(request):
    """Run the tiny models on one thread: their ops are too small to share, and
    on a busy machine every op would wait for a second thread to be scheduled
    (5 to 20 times slower here). Tests marked slow (full-size models) keep all
    threads. A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def answers_home(tmp_path, monkeypatch):
    """Every test keeps the learner's answers in a folder of its own, never in
    ~/.sdlearn: a check that passes keeps the answer it was given."""
    from sdlearn.checks import forget_tries

    home = tmp_path / "sdlearn-home"
    monkeypatch.setenv("SDLEARN_HOME", str(home))
    forget_tries()  # and the hints start over, as in a new session
    return home / "answers"
