"""Run metrics: TensorBoard event files that parse back with the logged scalars, a loss-curve PNG, S3."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app import storage
from app.tracking import EVENTS_DIR, PLOT, RunTracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scalars(events_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(events_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log_run(tracker: RunTracker, steps: range) -> None:
    for s in steps:
        m = {"step": s, "train_loss": 5.0 / s, "lr": 1e-3 * s, "tokens_per_s": 1000.0 + s, "grad_norm": 0.5 + s,
             "done": False, "epoch": s / 10}
        if s % 5 == 0:
            m["val_loss"] = 6.0 / s
        tracker.log(s, m)


def test_scalars_parse_back_and_the_png_is_drawn(tmp_path):
    run = tmp_path / "run"
    t = RunTracker(str(run), redraw_every_s=0)
    _log_run(t, range(1, 6))
    first_png = (run / PLOT).read_bytes()
    assert first_png[:8] == PNG_MAGIC  # drawn at the first evaluation, before close
    _log_run(t, range(6, 11))
    t.close()
    got = _scalars(str(run / EVENTS_DIR))
    assert got["loss/train"] == [(s, pytest.approx(5.0 / s)) for s in range(1, 11)]
    assert got["loss/val"] == [(5, pytest.approx(1.2)), (10, pytest.approx(0.6))]
    assert got["optim/lr"][-1] == (10, pytest.approx(1e-2)) and got["optim/grad_norm"][0] == (1, pytest.approx(1.5))
    assert got["speed/tokens_per_s"][3] == (4, pytest.approx(1004.0)) and "epoch" in got
    assert "done" not in got and "step" not in got  # bools and the step itself are not scalars
    assert (run / PLOT).read_bytes() != first_png  # redrawn with the later points


def test_png_waits_for_its_interval_events_do_not(tmp_path):
    run = tmp_path / "run"
    t = RunTracker(str(run))  # the default interval: not redrawn at every evaluation of a short run
    _log_run(t, range(1, 11))
    assert not (run / PLOT).exists()
    assert [s for s, _ in _scalars(str(run / EVENTS_DIR))["loss/val"]] == [5, 10]  # written out at evaluations
    t.redraw_every_s = 0
    _log_run(t, range(11, 16))
    assert (run / PLOT).read_bytes()[:8] == PNG_MAGIC
    t.close()


def test_resumed_run_keeps_its_curve(tmp_path):
    t = RunTracker(str(tmp_path / "run"), history={"train_loss": {"1": 9.0, "2": 8.0}, "val_loss": {"2": 8.5}})
    t.log(3, {"train_loss": 7.0})
    assert t.curves == {"train_loss": {1: 9.0, 2: 8.0, 3: 7.0}, "val_loss": {2: 8.5}}
    t.close()
    assert (tmp_path / "run" / PLOT).read_bytes()[:8] == PNG_MAGIC


def test_s3_run_dir_is_uploaded(s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    run = f"{s3_prefix}/run"
    t = RunTracker(run)
    _log_run(t, range(1, 6))
    t.close()
    names = [f[len(run) + 1:] for f in storage.list_files(run)]
    assert PLOT in names and any(n.startswith(EVENTS_DIR + "/events.out.tfevents") for n in names)
    assert storage.read_bytes(f"{run}/{PLOT}")[:8] == PNG_MAGIC
    local = tmp_path / "back"
    storage.download_dir(f"{run}/{EVENTS_DIR}", str(local))
    assert [s for s, _ in _scalars(str(local))["loss/val"]] == [5]
