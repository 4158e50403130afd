"""``deepufm run all --jobs N``: experiments in child processes (``deepufm.cli.jobs``).

The targets below are module-level so that a spawned child can import them by name; they stand
in for ``run_experiment`` (the real experiments take minutes)."""

import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest

from deepufm.cli import main
from deepufm.cli import run as run_cli
from deepufm.cli.jobs import Job, run_jobs
from deepufm.errors import ConfigError, Interrupted
from deepufm.experiments.report import Report
from deepufm.experiments.results import compare
from deepufm.training import signals
from report_checks import html_page


def fake_experiment(name, preset="quick", out=None, progress=True, **kwargs):
    """A report whose title records what the child was given and the threads it ran with."""
    import torch

    if name == "bad":
        raise ConfigError("--thing", 7, "an integer in [0, 3]")
    if name == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "b":
        warnings.warn("b ends at the zero solution", stacklevel=1)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    title = f"{name} {preset} progress={progress} threads={torch.get_num_threads()}"
    return Report(title, "", results=[compare("q", "T", 1, 1.0, 1.0, 0.1)])


def trains_until_signalled(name, ready: str, **kwargs):
    """Polls like the trainer: stops on the first signal as ``Interrupted``, after ``ready``."""
    with signals.deferred() as pending:
        Path(ready, name).touch()
        for epoch in range(6000):
            if pending():
                raise Interrupted(pending(), epoch, "checkpoint written")
            time.sleep(0.01)
    raise AssertionError("never signalled")


def test_jobs_report_in_order_with_their_threads_and_failures(capfd):
    jobs = [Job(n, {"preset": "paper"}) for n in ("a", "bad", "killed", "b")]
    outcomes, signum = run_jobs(jobs, workers=2, threads=1, target=fake_experiment)
    assert signum is None
    assert [(o.name, o.status) for o in outcomes] == [
        ("a", 0),
        ("bad", 2),
        ("killed", 137),
        ("b", 0),
    ]
    assert outcomes[0].report.title == "a paper progress=True threads=1"
    assert outcomes[1].report is None
    err = capfd.readouterr().err
    assert "deepufm run bad: error: invalid --thing=7: expected an integer in [0, 3]." in err
    assert "deepufm run b: warning: b ends at the zero solution" in err  # as the CLI says it


def test_a_signal_is_forwarded_once_and_stops_new_jobs(tmp_path):
    # SIGTERM to this process (the parent) reaches each running child once: they stop as the
    # trainer does (exit 143) and the queued third job never starts.
    jobs = [Job(n, {"ready": str(tmp_path)}) for n in ("x", "y", "z")]

    def signal_when_ready():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all((tmp_path / n).exists() for n in ("x", "y")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=signal_when_ready)
    timer.start()
    outcomes, signum = run_jobs(jobs, workers=2, threads=1, target=trains_until_signalled)
    timer.join()
    assert signum == signal.SIGTERM
    assert [(o.name, o.status) for o in outcomes] == [("x", 143), ("y", 143)]
    assert not (tmp_path / "z").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the parent's handler is undone


def test_run_all_with_jobs_shares_the_cpus_and_links_every_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_cli, "run_experiment", fake_experiment)
    monkeypatch.setattr(run_cli, "usable_cpus", lambda: 4)
    assert main(["run", "all", "--out", str(tmp_path), "--jobs", "2", "--preset", "paper"]) == 0
    page = html_page(tmp_path / "index.html")
    assert page.links == ["linear-ufm/report.html", "relu-ufm/report.html", "ce-ufm/report.html"]
    titles = [row[1] for row in page.tables[0][1:]]
    assert titles == [
        f"{n} paper progress=False threads=2" for n in ("linear-ufm", "relu-ufm", "ce-ufm")
    ]
    assert "in 2 processes (2 threads each" in capsys.readouterr().out


@pytest.mark.parametrize("jobs", ["0", "9"])
def test_jobs_out_of_range_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, jobs):
    monkeypatch.setattr(run_cli, "usable_cpus", lambda: 2)
    assert main(["run", "all", "--out", str(tmp_path / "r"), "--jobs", jobs]) == 2
    assert f"--jobs={jobs}" in capsys.readouterr().err.replace("\n", " ").replace("'", "")
    assert not (tmp_path / "r").exists()


def test_run_all_refuses_a_file_as_out_once_before_any_process(tmp_path, capfd):
    target = tmp_path / "f"
    target.write_text("mine")
    assert main(["run", "all", "--out", str(target), "--jobs", "2"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert err.count("expected a directory path") == 1 and "is a file" in err
    assert target.read_text() == "mine"
