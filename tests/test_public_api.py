"""Everything a user needs is importable from ``diffusiongym``; heavy optional imports stay lazy."""

import subprocess
import sys

import gymnasium as gym

import diffusiongym as dg


def test_all_names_resolve():
    missing = [name for name in dg.__all__ if not hasattr(dg, name)]
    assert not missing


def test_ids_live_under_the_namespace_with_both_entry_points():
    ids = [env_id for env_id in gym.registry if env_id.startswith("diffusiongym/")]
    assert {
        "diffusiongym/GMM1D-v0",
        "diffusiongym/GMM2D-v0",
        "diffusiongym/Digits-v0",
        "diffusiongym/DiscreteGrid-v0",
        "diffusiongym/DiscreteDigits-v0",
        "diffusiongym/TextToImage-v0",
    } <= set(ids)
    for env_id in ids:
        spec = gym.spec(env_id)
        assert spec.entry_point is not None and spec.vector_entry_point is not None


def test_import_does_not_pull_heavy_optional_packages():
    code = "import sys, diffusiongym; print(sorted(m for m in ('diffusers', 'sklearn', 'stable_baselines3', 'matplotlib', 'scipy', 'tensorboard', 'wandb', 'mkdocs', 'transformers', 'rapidocr_onnxruntime', 'onnxruntime', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
