"""Train the shipped discrete digits model: ``python -m diffusiongym.discrete.train_digits``.

Data: sklearn's 1797 8 x 8 digits binarised (pixel > 7) to 64 bits. Model: :class:`MLPPosterior` on the mask
source path (``K = 2``, ``D = 64``, ``kappa = t``) trained with the cross-entropy loss; plus a multinomial
logistic-regression digit classifier on the same bits (the ``DiscreteDigits-v0`` reward). Writes
``diffusiongym/weights/discrete_digits.safetensors`` (float16 weights: ``model.*``, ``classifier.weight``
(10, 64), ``classifier.bias`` (10,)) and ``discrete_digits.json`` (config and training summary).
Needs the ``train`` extra (scikit-learn). The run is seeded by ``--seed``: the network initialisation
draws from the global RNG inside :func:`~diffusiongym.utils.runtime.seeded` (the same stream as the
``torch.manual_seed`` call that produced the shipped weights), restored on return.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffusiongym.discrete.models import MLPPosterior
from diffusiongym.discrete.path import MixturePath
from diffusiongym.discrete.tasks import DIGITS_WEIGHTS
from diffusiongym.discrete.train import CrossEntropyConfig, train_posterior
from diffusiongym.utils.runtime import flush_denormals, seeded

__all__ = ["load_binary_digits", "main"]


def load_binary_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``(bits (1797, 64) long, labels (1797,) long)`` from sklearn's digits (pixel > 7)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("train_digits needs scikit-learn: pip install 'diffusiongym[train]'") from e
    d = load_digits()
    return torch.as_tensor(d.data > 7, dtype=torch.long), torch.as_tensor(d.target, dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    bits, labels = load_binary_digits()
    path = MixturePath(2, 64, source="mask")
    # the whole run inside seeded(): any global-RNG draw (initialisation) sees the same stream as before
    with seeded(args.seed), flush_denormals():
        model = MLPPosterior(path, hidden=args.hidden, layers=args.layers)
        cfg = CrossEntropyConfig(steps=args.steps, batch_size=256, lr=2e-3, seed=args.seed)
        hist = train_posterior(model, bits, cfg, progress=args.progress)

    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0).fit(bits.numpy(), labels.numpy())
    acc = float(clf.score(bits.numpy(), labels.numpy()))

    from safetensors.torch import save_file

    flat = {f"model.{k}": v.detach().half().contiguous() for k, v in model.state_dict().items()}
    flat["classifier.weight"] = torch.as_tensor(clf.coef_, dtype=torch.float16).contiguous()
    flat["classifier.bias"] = torch.as_tensor(clf.intercept_, dtype=torch.float16).contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(args.out.with_suffix(".safetensors")))
    config = {
        "model": model.config,
        "train": asdict(cfg),
        "final_loss": sum(hist["loss"][-10:]) / len(hist["loss"][-10:]),
        "classifier_train_accuracy": acc,
        "data": "sklearn digits > 7 (1797 x 64 bits)",
    }
    args.out.with_suffix(".json").write_text(json.dumps(config, indent=2, sort_keys=True))
    print(json.dumps({"final_loss": config["final_loss"], "classifier_train_accuracy": acc}))


if __name__ == "__main__":
    main()
