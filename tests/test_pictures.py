"""curves.png and confusion.png: written by every run, after every epoch, and never at the
cost of the checkpoint or the metrics."""

import struct
import sys

import pytest

from conftest import CNN_FAST, RESNET_FAST

PLOTS = [flag for flag in CNN_FAST if flag != "--no-plots"]
RESNET_PLOTS = [flag for flag in RESNET_FAST if flag != "--no-plots"]


def png_size(path):
    """(width, height) of a PNG file, from its header; fails on anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def assert_picture(path, min_size=(300, 200)):
    width, height = png_size(path)
    assert min_size[0] <= width <= 2000 and min_size[1] <= height <= 2000, (path, width, height)
    assert path.stat().st_size > 10_000  # drawn, not blank


@pytest.mark.parametrize("script, flags", [("cnn", PLOTS), ("resnet", RESNET_PLOTS + ["--freeze"])])
def test_training_and_eval_only_draw_their_pictures(request, image_folders, tmp_path, script, flags):
    main = request.getfixturevalue(script).main
    out = tmp_path / "run"
    assert main(["--data-dir", str(image_folders), "--out", str(out), *flags, "--epochs", "2"]) == 0
    assert_picture(out / "curves.png")
    assert_picture(out / "confusion.png")
    assert main(["--data-dir", str(image_folders), "--device", "cpu", "--eval-only",
                 "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval")]) == 0
    assert_picture(tmp_path / "eval" / "confusion.png")
    assert not (tmp_path / "eval" / "curves.png").exists()


def test_pictures_are_there_after_each_epoch(cnn, image_folders, tmp_path):
    out = tmp_path / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *PLOTS,
                     "--epochs", "3", "--stop-after", "1"]) == 0
    assert_picture(out / "curves.png")
    assert_picture(out / "confusion.png")


def test_no_plots(cnn, image_folders, tmp_path):
    out = tmp_path / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *PLOTS, "--epochs", "1",
                     "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]


def test_a_plotting_failure_is_one_warning(cnn, image_folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were missing
    out = tmp_path / "run"
    assert cnn.main(["--data-dir", str(image_folders), "--out", str(out), *PLOTS, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "could not draw the pictures" in warnings[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]
