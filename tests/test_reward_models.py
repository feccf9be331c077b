"""Rewards on pretrained models: CLIP score, PickScore, the LAION aesthetic head, OCR.

Tiny random ``CLIPModel`` s (real transformers classes, small configs) with a tokenizer built from a
small local vocabulary are saved to a temporary folder and loaded through the public loaders; the
rewards are compared with the formulas computed by hand from ``get_image_features`` /
``get_text_features``. OCR reads text rendered with Pillow. No socket may connect.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from diffusiongym.rewards import (  # noqa: E402
    AestheticHead,
    AestheticReward,
    CLIPImagePreprocess,
    CLIPScore,
    OCRReward,
    PickScore,
    load_aesthetic_head,
    load_clip,
)
from diffusiongym.rewards.ocr import levenshtein, quoted_text  # noqa: E402

PROMPTS = ["a cat", "a red dog", "sky"]
MAX_LEN = 16  # the tiny text model's max_position_embeddings: the tokenizer pads to it
LOGIT_SCALE = math.log(20.0)  # not CLIP's initial log(1/0.07), so a wrong temperature shows


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every socket connection fails and is recorded; the test fails if one was tried."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network disabled by test_reward_models")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


def _tokenizer_files(folder: Path) -> dict[str, int]:
    """A CLIP BPE vocabulary: single letters, letters ending a word, a few merges, the two specials."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = ["a t</w>", "c at</w>", "r e", "re d</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def _tiny_clip(folder: Path, seed: int, projection_dim: int = 12) -> None:
    vocab = _tokenizer_files(folder)
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_LEN,
            eos_token_id=eos,
            bos_token_id=bos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=24,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)  # transformers initialises from the global RNG (restored by conftest)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    # resize the shortest side to 28, crop 24: both steps are exercised on non-square inputs
    transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}).save_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    _tiny_clip(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """The published head's layout (layers.0/2/4/6/7, dropouts at 1/3/5) at a small size."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sizes = {0: (20, 12), 2: (10, 20), 4: (8, 10), 6: (4, 8), 7: (1, 4)}
    state = {}
    for i, (out, inp) in sizes.items():
        state[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"layers.{i}.bias"] = torch.randn(out, generator=g)
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_file(state, str(path))
    return path, state


def _images(n, h=32, w=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)  # inside (-1, 1)


def _by_hand_cosine(backbone, x, prompts):
    """cos(image, text) from the model's own feature methods and explicit norms."""
    model = backbone.model
    unit = ((x + 1) / 2).to(next(model.parameters()).dtype)
    pixels = backbone.preprocess(unit)
    img = model.get_image_features(pixel_values=pixels).pooler_output
    tok = backbone.tokenizer(prompts, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    return (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))


# ------------------------------------------------------------------------------ CLIP score / PickScore
def test_clip_score_and_pickscore_equal_the_formulas_by_hand(clip_dir):
    x = _images(3)
    clip = CLIPScore.from_pretrained(clip_dir, scale=2.5)
    pick = PickScore.from_pretrained(clip_dir)
    with torch.no_grad():
        cos = _by_hand_cosine(clip.backbone, x, PROMPTS)
        r_clip, valid = clip(x, prompt=PROMPTS)
        r_pick, _ = pick(x, prompt=PROMPTS)
    # float32 forward passes of the same graph: agreement to rounding (measured < 1e-7)
    torch.testing.assert_close(r_clip, 2.5 * cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_pick, 20.0 * cos, rtol=1e-5, atol=1e-5)
    assert valid.tolist() == [True] * 3
    assert pick.logit_scale() == pytest.approx(20.0, rel=1e-6) and clip.range == (-2.5, 2.5)
    assert len(set(cos.tolist())) == 3  # the prompts (and images) really differ


def test_torch_preprocessing_matches_the_transformers_processor(clip_dir):
    backbone = load_clip(clip_dir)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    g = np.random.default_rng(0)
    arrays = []
    for h, w in ((40, 56), (56, 40), (20, 20), (100, 90)):  # down- and upsampling, both orientations
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        phase = g.uniform(0, 2 * np.pi, (3, 1, 1))
        wave = np.sin(0.3 * yy + 0.2 * xx + phase) + 0.5 * np.cos(0.17 * xx - 0.4 * yy + 2 * phase)
        arrays.append((127.5 + 60 * wave).round().astype(np.uint8).transpose(1, 2, 0))
    for arr in arrays:
        ref = processor(images=[arr], return_tensors="pt")["pixel_values"]
        ours = backbone.preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].double() / 255)
        assert ours.shape == ref.shape == (1, 3, 24, 24)
        # torch's antialiased bicubic equals PIL's float resize to 1e-5 gray levels; the processor's
        # uint8 path rounds between PIL's two passes: 1/255 / std (0.26) = 0.015 at most, measured
        # 0.015 (pixel noise, which PIL also clips between passes, differs more: smooth images here).
        # A wrong mean, std, crop offset or kernel gives differences of order 0.1 to 1.
        torch.testing.assert_close(ours.float(), ref, rtol=0, atol=0.02)


def test_preprocess_config_variants():
    x = torch.rand(1, 3, 40, 60, dtype=torch.float64)
    old_style = CLIPImagePreprocess.from_config({"size": 30, "crop_size": 20})  # plain ints
    assert old_style.size == 30 and old_style.crop_size == (20, 20) and old_style(x).shape == (1, 3, 20, 20)
    exact = CLIPImagePreprocess.from_config({"size": {"height": 20, "width": 30}, "do_center_crop": False})
    assert exact(x).shape == (1, 3, 20, 30)
    plain = CLIPImagePreprocess.from_config({"do_resize": False, "do_center_crop": False, "do_normalize": False})
    torch.testing.assert_close(plain(x), x)
    with pytest.raises(ValueError, match="size"):
        CLIPImagePreprocess.from_config({"size": 10**9})


def test_batched_equals_per_sample_and_chunks(clip_dir):
    x = _images(4, seed=2)
    prompts = ["a cat", "sky", "a cat", "a red dog"]
    whole = CLIPScore.from_pretrained(clip_dir)
    chunked = CLIPScore.from_pretrained(clip_dir, batch_size=3)
    with torch.no_grad():
        batch = whole(x, prompt=prompts)[0]
        single = torch.cat([whole(x[i : i + 1], prompt=prompts[i])[0] for i in range(4)])
        torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked(x, prompt=prompts)[0], batch, rtol=1e-5, atol=1e-6)


def test_prompt_conventions_and_errors(clip_dir):
    x = _images(3, seed=3)
    table_reward = CLIPScore.from_pretrained(clip_dir, prompts=PROMPTS)
    with torch.no_grad():
        by_text = table_reward(x, prompt=["sky", "a cat", "sky"])[0]
        by_index = table_reward(x, prompt_index=torch.tensor([2, 0, 2]))[0]
        by_call_table = table_reward(x, prompt_index=[0, 1, 0], prompts=["sky", "a cat"])[0]
        same = table_reward(x, prompt="sky")[0]
        per_sample_same = table_reward(x, prompt=["sky"] * 3)[0]
    torch.testing.assert_close(by_index, by_text)
    torch.testing.assert_close(by_call_table, by_text)
    torch.testing.assert_close(same, per_sample_same)
    with pytest.raises(ValueError, match="prompt: this reward scores images against a prompt"):
        table_reward(x)
    with pytest.raises(ValueError, match=r"prompt: expected a string or 3 strings"):
        table_reward(x, prompt=["a", "b"])
    with pytest.raises(ValueError, match=r"prompt_index: expected indices in 0..2"):
        table_reward(x, prompt_index=[0, 1, 3])
    with pytest.raises(ValueError, match="no prompt table"):
        CLIPScore.from_pretrained(clip_dir)(x, prompt_index=0)
    with pytest.raises(TypeError, match="prompt_index: expected integer"):
        table_reward(x, prompt_index=torch.zeros(3))


def test_validity_and_image_range(clip_dir):
    reward = CLIPScore.from_pretrained(clip_dir)
    unit_reward = CLIPScore(reward.backbone, image_range=(0.0, 1.0))
    x = _images(4, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(unit_reward((x + 1) / 2, prompt="sky")[0], reward(x, prompt="sky")[0])
        x[1, 0, 3, 3] = float("nan")
        x[2, 1, 0, 0] = 1.7  # beyond the default tolerance 0.5
        x[3, 2, 5, 5] = 1.3  # overshoot within it
        values, valid = reward(x, prompt="sky")
    assert valid.tolist() == [True, False, False, True] and values.shape == (4,)
    with pytest.raises(ValueError, match=r"\(n, 1 or 3, H, W\)"):
        reward(torch.zeros(2, 4, 8, 8), prompt="sky")
    grey = torch.zeros(1, 1, 30, 30)
    torch.testing.assert_close(reward(grey, prompt="sky")[0], reward(grey.expand(1, 3, 30, 30), prompt="sky")[0])


# ------------------------------------------------------------------------------ aesthetic head
def test_aesthetic_reward_equals_the_mlp_by_hand(clip_dir, head_file):
    path, state = head_file
    reward = AestheticReward.from_pretrained(clip_dir, path)
    x = _images(3, seed=5)
    with torch.no_grad():
        values, valid = reward(x)
        model = reward.backbone.model
        f = model.get_image_features(pixel_values=reward.backbone.preprocess((x + 1) / 2)).pooler_output
        h = f / f.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations in the published head
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(values, h[:, 0], rtol=1e-5, atol=1e-5)
    assert valid.all() and repr(reward) == "AestheticReward(head=12-20-10-8-4-1)"


def test_aesthetic_linear_head_and_head_errors(tmp_path, clip_dir):
    from safetensors.torch import save_file

    w, b = torch.randn(1, 12), torch.randn(1)
    save_file({"weight": w, "bias": b}, str(tmp_path / "linear.safetensors"))
    head = load_aesthetic_head(tmp_path / "linear.safetensors")
    e = F.normalize(torch.randn(2, 12), dim=-1)
    torch.testing.assert_close(head(e), (e @ w.T + b)[:, 0])
    (tmp_path / "head.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only safetensors is read.*convert_aesthetic_head"):
        load_aesthetic_head(tmp_path / "head.pth")
    with pytest.raises(FileNotFoundError, match="no aesthetic head file"):
        load_aesthetic_head(tmp_path / "absent.safetensors")
    save_file({"layers.0.weight": torch.zeros(4, 12)}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"layers.0.bias"):
        load_aesthetic_head(tmp_path / "broken.safetensors")
    wrong = AestheticHead.from_state_dict({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="takes 7 features but the CLIP model embeds images in 12"):
        AestheticReward(load_clip(clip_dir, need_tokenizer=False), wrong)


def _converter():
    path = Path(__file__).resolve().parents[1] / "scripts" / "convert_aesthetic_head.py"
    spec = importlib.util.spec_from_file_location("convert_aesthetic_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pth_converter_reads_the_published_layout_without_unpickling(tmp_path, monkeypatch):
    converter = _converter()
    torch.manual_seed(3)
    # the published class: Linear/Dropout stack without activations, saved as a state dict
    published = torch.nn.Sequential(
        torch.nn.Linear(12, 20),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(20, 10),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(10, 8),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 4),
        torch.nn.Linear(4, 1),
    ).eval()
    torch.save({f"layers.{k}": v for k, v in published.state_dict().items()}, tmp_path / "head.pth")
    converter.convert(tmp_path / "head.pth", tmp_path / "head.safetensors")
    head = load_aesthetic_head(tmp_path / "head.safetensors")
    e = F.normalize(torch.randn(3, 12), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(head(e), published(e)[:, 0])
    # a pickle that would run a command when unpickled is refused, and nothing runs
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(ValueError, match=r"refuses the global (posix|os|nt)\.system"):
        converter.read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned_by_pickle").exists()
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"weight": 1}))
    with pytest.raises(ValueError, match="not a zip-format"):
        converter.read_state_dict(tmp_path / "legacy.pth")


# ------------------------------------------------------------------------------ gradients
def test_gradients_match_finite_differences_in_float64(clip_dir, head_file):
    x0 = _images(2, h=26, w=30, seed=6, dtype=torch.float64)
    rewards = {
        "clip": (CLIPScore.from_pretrained(clip_dir, dtype=torch.float64), {"prompt": ["a cat", "sky"]}),
        "pick": (PickScore.from_pretrained(clip_dir, dtype=torch.float64), {"prompt": "a red dog"}),
        "aesthetic": (AestheticReward.from_pretrained(clip_dir, head_file[0], dtype=torch.float64), {}),
    }
    pixels = [(0, 0, 5, 7), (1, 2, 13, 20)]
    for name, (reward, cond) in rewards.items():
        assert reward.differentiable
        x = x0.clone().requires_grad_(True)
        values, _ = reward(x, **cond)
        (grad,) = torch.autograd.grad(values.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        eps = 1e-6
        for idx in pixels:
            up, down = x0.clone(), x0.clone()
            up[idx] += eps
            down[idx] -= eps
            with torch.no_grad():
                fd = (reward(up, **cond)[0].sum() - reward(down, **cond)[0].sum()) / (2 * eps)
            # central differences in float64: truncation O(eps^2) and rounding ~1e-16 / eps = 1e-10
            assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), (name, idx)


# ------------------------------------------------------------------------------ loading errors
def test_missing_folders_and_components_are_named(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="no folder"):
        CLIPScore.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="source: expected a folder or a hub id, got an empty string"):
        CLIPScore.from_pretrained("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPScore.from_pretrained(empty)
    (empty / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CLIPScore.from_pretrained(empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle weights.*safetensors only"):
        CLIPScore.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="processor_source: .* no tokenizer"):
        CLIPScore.from_pretrained(clip_dir, processor_source=empty)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        if (clip_dir / name).exists():
            (empty / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPScore.from_pretrained(clip_dir, processor_source=empty)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*never downloads"):
        CLIPScore.from_pretrained("tiny-org/not-cached-clip", cache_dir=tmp_path / "empty_cache")
    # a hub id in the local cache is read from its snapshot folder, without a connection (autouse fixture)
    snapshot = tmp_path / "cache" / "models--tiny-org--clip" / "snapshots" / ("0" * 40)
    shutil.copytree(clip_dir, snapshot)
    (tmp_path / "cache" / "models--tiny-org--clip" / "refs").mkdir()
    (tmp_path / "cache" / "models--tiny-org--clip" / "refs" / "main").write_text("0" * 40)
    cached = CLIPScore.from_pretrained("tiny-org/clip", cache_dir=tmp_path / "cache")
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(cached(x, prompt="sky")[0], CLIPScore.from_pretrained(clip_dir)(x, prompt="sky")[0])
    with pytest.raises(ValueError, match="got the file"):
        CLIPScore.from_pretrained(clip_dir / "config.json")
    no_tok = load_clip(clip_dir, need_tokenizer=False)
    with pytest.raises(ValueError, match="needs the CLIP tokenizer"):
        CLIPScore(no_tok)


# ------------------------------------------------------------------------------ OCR
def _render(text: str, size: int = 40, width: int = 256, height: int = 80) -> torch.Tensor:
    """Black text on white with Pillow's scalable default font (Pillow >= 10.1), as (1, 3, H, W) in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((10, 15), text, fill="black", font=ImageFont.load_default(size=size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime")
    return OCRReward(engine_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


def test_ocr_reads_rendered_text(ocr):
    x = torch.cat([_render("HELLO"), _render("HELLO"), torch.ones(1, 3, 80, 256)])  # last: blank white
    assert ocr.read(x[:1]) == ["HELLO"]
    values, valid = ocr(x, prompt=['a sign that says "hello"', 'a sign that says "WORLD"', 'a sign "HELLO"'])
    # the read text equals the target (case ignored): 1; "hello" vs "world": lev 4 of 5 -> 0.2;
    # nothing read in a blank image: 0, and it stays valid (a low reward, not a broken sample)
    assert values.tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert valid.tolist() == [True, True, True] and not ocr.differentiable
    nan = _render("HELLO")
    nan[0, 0, 0, 0] = float("nan")
    fixed = OCRReward("HELL0", engine=ocr.engine, case_sensitive=True)
    values, valid = fixed(torch.cat([nan, _render("HELLO")]))
    assert valid.tolist() == [False, True] and values[1].item() == pytest.approx(0.8)  # one substitution


def test_ocr_targets_and_edit_distance():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert quoted_text('a neon sign "OPEN 24h" at night') == "OPEN 24h" and quoted_text("no quotes") == "no quotes"
    reward = OCRReward("Open 24h", engine=lambda img: (None, None))
    assert reward.similarity("open24H", "Open 24h") == 1.0 and reward.similarity("xyz", "ab") == 0.0
    with pytest.raises(ValueError, match="target: expected a target text"):
        OCRReward("  ", engine=lambda img: (None, None))
    with pytest.raises(ValueError, match="prompt: this reward scores images against a prompt"):
        OCRReward(engine=lambda img: (None, None))(torch.zeros(1, 3, 8, 8))
