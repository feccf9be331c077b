"""``python -m diffusiongym.demo`` on a tiny budget: the figures are written and are PNGs, and the
printed before/after lines carry the numbers (the full run's figures are measured in the report)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from diffusiongym import demo
from diffusiongym.loggers import read_metrics

FLOAT = r"(-?\d+\.\d+)"


def test_demo_writes_the_figures_and_prints_before_and_after(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    demo.main(["--out", str(out), "--iterations", "2", "--gmm-iterations", "2", "--num-samples", "8", "--no-progress"])
    printed = capsys.readouterr().out
    for name in demo.FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
            image.verify()
    rows = {}
    for name in ("before", "after"):
        match = re.search(rf"^\s+{name}\s+{FLOAT}\s+{FLOAT}\s+{FLOAT}\s+{FLOAT}\s*$", printed, re.M)
        assert match, printed
        rows[name] = [float(v) for v in match.groups()]  # objective, KL, reward, class fraction
    objective, kl, reward, fraction = rows["before"]
    assert kl == 0.0  # before training the fine-tuned copy equals the base: u = 0 exactly
    assert math.isclose(objective, demo.DIGIT_LAMBDA * reward, abs_tol=2e-3)  # E[lambda r] - 0 (3 decimals printed)
    for _, kl, reward, fraction in rows.values():
        assert 0.0 <= fraction <= 1.0 and reward <= 0.0 and kl >= 0.0  # a fraction; log-probabilities; a KL
    assert re.search(rf"objective base {FLOAT} \(exact\) -> adapted {FLOAT}.*gap closed {FLOAT}", printed)
    assert "requested class recognised" in printed and "optimal control u*" in printed
    log = read_metrics(out / "metrics.csv")  # the curve's data: one row per iteration
    assert log["step"] == [0.0, 1.0] and {"objective", "kl", "reward"} <= set(log)
    assert np.isfinite(log["objective"]).all()
    assert sorted(p.name for p in (out / "metrics_images").iterdir()) == [
        "samples_000000.png",
        "samples_000001.png",
        "samples_000002.png",
    ]


@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--num-samples", "-1"], ["--target", "10"]])
def test_demo_rejects_bad_arguments(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran
