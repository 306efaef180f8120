"""`jaxlm plot` and the curves a run draws at each eval: real PNGs, read back as pixels."""

import numpy as np
import pytest
from PIL import Image

from jaxlm.cli import main
from jaxlm.plot import smooth

RUN_COLOURS = [(31, 119, 180), (255, 127, 14)]  # matplotlib's C0 and C1


def _pixels_of(png, colour) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB"))
    return int((rgb == colour).all(axis=-1).sum())


def test_two_runs_give_two_lines_in_the_png(finished_runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", str(finished_runs["finished"]), str(finished_runs["resumed"]), "--out", str(out)]) == 0
    assert "finished, resumed" in capsys.readouterr().out
    assert Image.open(out).size == (960, 640)
    assert all(_pixels_of(out, colour) > 500 for colour in RUN_COLOURS)


@pytest.mark.parametrize("name", ["finished", "resumed"])
def test_one_run_gives_one_line(name, finished_runs, tmp_path):
    out = tmp_path / "one.png"
    assert main(["plot", str(finished_runs[name]), "--out", str(out)]) == 0
    assert _pixels_of(out, RUN_COLOURS[0]) > 500 and _pixels_of(out, RUN_COLOURS[1]) == 0


@pytest.mark.parametrize("name", ["finished", "resumed"])
def test_a_run_draws_its_curves_at_every_eval(name, finished_runs):
    curves = finished_runs[name] / "curves.png"
    assert Image.open(curves).size == (960, 640) and _pixels_of(curves, RUN_COLOURS[0]) > 500


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jaxlm: error: {tmp_path} has no metrics.jsonl; pass the run_dir of a `jaxlm train` run"


def test_smoothing_is_debiased_from_the_first_value():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])
