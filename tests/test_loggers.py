"""Training logs: the CSV, TensorBoard and wandb back-ends, sample grids, and the Trainer hook.

Each back-end is read back with its own reader (our CSV reader and the csv module, TensorBoard's
``EventAccumulator``, the records of wandb's offline ``.wandb`` file) and compared exactly with
what was logged. The Trainer hook must log exactly ``trainer.history`` and leave training
bit-identical (sample grids use their own generator).
"""

from __future__ import annotations

import copy
import csv
import glob
import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusiongym.loggers import CSVLogger, Logger, MultiLogger, TensorBoardLogger, make_grid, read_metrics
from diffusiongym.loggers.grid import grid_to_uint8, to_grid
from diffusiongym.models.digits import digits_environment
from diffusiongym.rewards.images import BrightnessReward
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig


class Recorder(Logger):
    """Keeps every call (for MultiLogger and Trainer checks)."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[str, int, np.ndarray]] = []
        self.flushed = self.closed = 0

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_images(self, name, images, step, value_range=(-1.0, 1.0)):
        self.images.append((name, step, to_grid(images, value_range)))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def read_png(path: Path) -> np.ndarray:
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as image:
        return np.asarray(image)


def value_matching(iterations: int = 6) -> ValueMatching:
    config = ValueMatchingConfig(
        iterations=iterations, batch_size=32, updates_per_iteration=2, minibatch_size=64, replay=1, seed=0
    )
    return ValueMatching("GMM1D-v0", config=config, steps=10)


def digits_adjoint(iterations: int = 2) -> AdjointMatching:
    """A small image trainer: Adjoint Matching of the digits UNet on 15 steps (coarser grids blow
    up near t = 0, where the memoryless sigma is large), batches of 4."""
    env = digits_environment(noise="memoryless")
    config = AdjointMatchingConfig(
        iterations=iterations, batch_size=4, lr=3e-4, max_grad_norm=1.0, loss_times=2, always_last=1, seed=0
    )
    model = copy.deepcopy(env.model).requires_grad_(True)
    return AdjointMatching(env, BrightnessReward(), 1.0, model=model, config=config, steps=15, t_start=0.01)


def test_back_ends_are_imported_only_when_made():
    code = (
        "import sys, diffusiongym, diffusiongym.loggers; "
        "print(sorted(m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_missing_back_ends_name_the_extra_to_install(tmp_path, monkeypatch):
    from diffusiongym.loggers import WandbLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"diffusiongym\[logging\]"):
        TensorBoardLogger(tmp_path / "tb")
    with pytest.raises(ImportError, match=r"diffusiongym\[wandb\]"):
        WandbLogger(mode="offline", dir=tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- grids
def test_make_grid_layout_and_values():
    images = torch.full((5, 1, 2, 3), -1.0)
    images[1] = 1.0
    images[2, 0, 0, 0] = float("nan")
    images[3] = 0.0
    grid = make_grid(images)  # ceil(sqrt(5)) = 3 per row, 2 rows, 1-pixel white padding
    assert grid.shape == (1, 2 * 3 + 1, 3 * 4 + 1) and grid.dtype == np.float32
    assert (grid[0, 0] == 1.0).all() and (grid[0, :, 0] == 1.0).all()  # padding
    assert (grid[0, 1:3, 1:4] == 0.0).all()  # -1 -> black
    assert (grid[0, 1:3, 5:8] == 1.0).all()  # +1 -> white
    assert grid[0, 1, 9] == 0.0 and (grid[0, 1:3, 9:12].sum() == 0.0)  # NaN drawn black
    assert (grid[0, 4:6, 1:4] == 0.5).all()  # 0 -> mid grey
    assert (grid[0, 4:6, 9:12] == 1.0).all()  # the empty sixth cell is padding
    assert make_grid(images, nrow=5).shape == (1, 1 + 2 + 1, 5 * 4 + 1)  # one row
    auto = make_grid(torch.tensor([[[[2.0, 4.0]]]]), padding=0, value_range=None)  # min-max
    np.testing.assert_array_equal(auto, [[[0.0, 1.0]]])
    with pytest.raises(ValueError, match="images"):
        make_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(TypeError, match="images"):
        make_grid([[0.0]])
    with pytest.raises(ValueError, match="value_range"):
        make_grid(images, value_range=(1.0, 1.0))


# --------------------------------------------------------------------------------- CSV
def test_csv_round_trip_with_a_key_that_appears_later(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    with CSVLogger(path) as logger:
        logger.log_metrics({"loss": 0.1 + 0.2, "kl": torch.tensor(2.5)}, step=0)
        logger.log_metrics({"loss": float("nan")}, step=1)
        logger.log_metrics({"loss": float("inf"), "reward": -1e-300}, step=2)  # a new key: the file widens
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss", "kl", "reward"]
    assert rows[1] == ["0", repr(0.1 + 0.2), "2.5", ""]  # earlier rows get an empty cell
    assert rows[2] == ["1", "nan", "", ""]
    back = read_metrics(path)
    assert back["step"] == [0.0, 1.0, 2.0]
    assert back["loss"][0] == 0.1 + 0.2 and math.isnan(back["loss"][1]) and back["loss"][2] == math.inf
    assert back["kl"][0] == 2.5 and math.isnan(back["kl"][2])
    assert math.isnan(back["reward"][0]) and back["reward"][2] == -1e-300

    with CSVLogger(path, append=True) as logger:  # resume: the columns and rows are kept
        logger.log_metrics({"kl": 1.0, "lr": 0.5}, step=3)
    back = read_metrics(path)
    assert list(back) == ["step", "loss", "kl", "reward", "lr"] and back["step"] == [0.0, 1.0, 2.0, 3.0]
    assert back["kl"][3] == 1.0 and back["lr"][3] == 0.5 and math.isnan(back["lr"][0])
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind

    with CSVLogger(path) as logger:  # without append: a fresh file
        pass
    assert path.read_text() == "step\n"


def test_csv_images_are_pngs_of_the_grid(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # RGB
    logger = CSVLogger(tmp_path / "metrics.csv")
    logger.log_images("train/samples", images, step=7)
    logger.log_images("one", images[0, :1], step=0)  # a single (C, H, W) image
    png = read_png(tmp_path / "metrics_images" / "train_samples_000007.png")
    np.testing.assert_array_equal(png, grid_to_uint8(make_grid(images)))
    single = read_png(tmp_path / "metrics_images" / "one_000000.png")
    np.testing.assert_array_equal(single, grid_to_uint8(to_grid(images[0, :1]))[..., 0])
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log_metrics({"a": 1.0}, 0)


def test_bad_logger_arguments(tmp_path):
    logger = CSVLogger(tmp_path / "m.csv")
    with pytest.raises(TypeError, match=r"metrics\['a'\]"):
        logger.log_metrics({"a": "x"}, 0)
    with pytest.raises(TypeError, match="metrics"):
        logger.log_metrics([("a", 1.0)], 0)
    with pytest.raises(ValueError, match="step"):
        logger.log_metrics({"a": 1.0}, -1)
    with pytest.raises(TypeError, match="step"):
        logger.log_metrics({"a": 1.0}, 1.5)
    with pytest.raises(ValueError, match="'step'"):
        logger.log_metrics({"step": 1.0}, 0)
    with pytest.raises(TypeError, match="name"):
        logger.log_images("", torch.zeros(1, 1, 2, 2), 0)
    with pytest.raises(TypeError, match="path"):
        CSVLogger(3)
    with pytest.raises(TypeError, match="loggers"):
        MultiLogger(logger, "not a logger")
    assert read_metrics(tmp_path / "m.csv") == {"step": []}  # nothing bad was written


def test_multi_logger_fans_out_and_closes_all(tmp_path):
    a, b = Recorder(), Recorder()
    with MultiLogger(a, CSVLogger(tmp_path / "m.csv"), b) as multi:
        multi.log_metrics({"x": 1.0}, 4)
        multi.log_images("g", torch.zeros(2, 1, 2, 2), 4)
        multi.flush()
    for rec in (a, b):
        assert rec.metrics == [(4, {"x": 1.0})] and [(n, s) for n, s, _ in rec.images] == [("g", 4)]
        assert rec.flushed == 1 and rec.closed == 1
    assert read_metrics(tmp_path / "m.csv") == {"step": [4.0], "x": [1.0]}


# ------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_and_image_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with TensorBoardLogger(tmp_path / "tb") as logger:
        for step in range(3):
            logger.log_metrics({"loss": 1.0 / (step + 1), "kl": 0.25 * step}, step)
        logger.log_images("samples", images, step=2)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "kl"} and acc.Tags()["images"] == ["samples"]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 2]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-7)  # stored as float32
    (image,) = acc.Images("samples")
    grid = make_grid(images)
    assert image.step == 2 and (image.height, image.width) == grid.shape[1:]
    Image = pytest.importorskip("PIL.Image")
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L"))
    np.testing.assert_array_equal(decoded, grid_to_uint8(grid)[..., 0])  # PNG: lossless


# ------------------------------------------------------------------------------- wandb
def wandb_records(path: str):
    """The protobuf records of an offline ``.wandb`` file (LevelDB log format: 7-byte file
    header, 32 KiB blocks, records of checksum u32, length u16, type u8 (1 full, 2 first,
    3 middle, 4 last))."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = Path(path).read_bytes()
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def test_wandb_offline_run_writes_the_logged_values(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from diffusiongym.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with WandbLogger(project="diffusiongym-test", mode="offline", dir=tmp_path, config={"lr": 0.1}) as logger:
        logger.log_metrics({"loss": 0.5, "kl": 2.0}, 0)
        logger.log_metrics({"loss": 0.25}, 1)
        logger.log_images("samples", torch.zeros(4, 1, 8, 8), 1)
    wandb.teardown()  # finish() may return before wandb's service has written the file; this waits for it
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.append(items)
    assert [h["_step"] for h in history] == [0, 1]
    assert history[0]["loss"] == 0.5 and history[0]["kl"] == 2.0 and history[1]["loss"] == 0.25
    assert history[1]["samples/_type"] == "image-file" and history[1]["samples/width"] == 19  # 2 x 2 grid of 8 + 3
    assert glob.glob(str(Path(run_file).parent / "files" / "media" / "images" / "samples_1_*.png"))
    with pytest.raises(ValueError, match="mode"):
        WandbLogger(mode="sometimes")


# ----------------------------------------------------------------------- Trainer hook
def test_trainer_logs_exactly_its_history(tmp_path):
    trainer = value_matching()
    recorder = Recorder()
    with CSVLogger(tmp_path / "metrics.csv") as csv_logger:
        history = trainer.train(progress=False, logger=MultiLogger(csv_logger, recorder))
    logged = read_metrics(tmp_path / "metrics.csv")
    assert set(logged) == (set(history) - {"iteration"}) | {"step"}
    assert logged["step"] == history["iteration"] == [float(i) for i in range(6)]
    for key in set(history) - {"iteration"}:
        np.testing.assert_array_equal(logged[key], history[key], err_msg=key)  # repr round trip: exact
    assert recorder.flushed == 1 and recorder.closed == 0  # flushed, left open for the caller

    sparse = Recorder()
    value_matching().train(progress=False, logger=sparse, log_every=4)
    assert [step for step, _ in sparse.metrics] == [0, 4]
    expected = {k: v[4] for k, v in history.items() if k not in ("iteration", "seconds")}  # same seed, same run
    assert {k: v for k, v in sparse.metrics[1][1].items() if k != "seconds"} == expected


def test_trainer_rejects_bad_logging_arguments(tmp_path):
    trainer = value_matching()
    with pytest.raises(TypeError, match="logger"):
        trainer.train(1, logger=print)
    with pytest.raises(ValueError, match="log_every"):
        trainer.train(1, logger=Recorder(), log_every=0)
    with pytest.raises(TypeError, match="log_every"):
        trainer.train(1, logger=Recorder(), log_every=1.0)
    with pytest.raises(ValueError, match="log_samples_every.*image"):
        trainer.train(1, logger=Recorder(), log_samples_every=1)
    with pytest.raises(ValueError, match="log_samples_every.*logger"):
        trainer.train(1, log_samples_every=1)
    assert trainer.iteration == 0 and trainer.history == {}  # nothing ran


def test_image_trainer_logs_sample_grids_without_changing_training(tmp_path):
    logged, plain = digits_adjoint(), digits_adjoint()
    with CSVLogger(tmp_path / "metrics.csv") as logger:
        logged.train(progress=False, logger=logger, log_samples_every=1, log_num_samples=4)
    plain.train(progress=False)
    assert logged.history["valid_fraction"] == [1.0, 1.0]
    for key in set(plain.history) - {"seconds"}:  # the grids draw from their own generator
        np.testing.assert_array_equal(logged.history[key], plain.history[key], err_msg=key)
    for (name, a), b in zip(logged.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name
    pngs = sorted(p.name for p in (tmp_path / "metrics_images").iterdir())
    assert pngs == ["samples_000000.png", "samples_000001.png", "samples_000002.png"]
    # the first grid is the base model's samples on the grid seed; the last the trained policy's
    seed = logged.init_seed("log_samples")
    first = digits_adjoint().sample(4, seed=seed).x1
    np.testing.assert_array_equal(
        read_png(tmp_path / "metrics_images" / "samples_000000.png"), grid_to_uint8(make_grid(first))[..., 0]
    )
    last = logged.sample(4, seed=seed).x1
    np.testing.assert_array_equal(
        read_png(tmp_path / "metrics_images" / "samples_000002.png"), grid_to_uint8(make_grid(last))[..., 0]
    )
    assert not torch.equal(first, last)
