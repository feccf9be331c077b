"""Convert a PyTorch state-dict checkpoint (e.g. the LAION aesthetic head ``.pth``) to safetensors,
without unpickling it.

    python scripts/convert_aesthetic_head.py sac+logos+ava1-l14-linearMSE.pth aesthetic_head.safetensors

A checkpoint written by ``torch.save`` (PyTorch >= 1.6, zip format) holds ``<name>/data.pkl``, the
pickled state dict, and ``<name>/data/<key>``, the raw bytes of each tensor storage. Loading it
with ``pickle`` or ``torch.load`` runs whatever the pickle names; this script never does: it reads
the pickle's opcodes with :func:`pickletools.genops` (a parser) and interprets only what a state
dict is made of (an ``OrderedDict`` of tensors rebuilt by ``torch._utils._rebuild_tensor_v2`` from
storages of the standard dtypes). Any other global, or an opcode a state dict does not use, stops
it with an error naming it; nothing from the file is imported or called. The legacy (pre-1.6,
non-zip) format is refused. Keys and shapes are printed so they can be compared with the table in
``diffusiongym/rewards/aesthetic.py``.
"""

from __future__ import annotations

import argparse
import os
import pickletools
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")} | {
    ("torch", name) for name in _STORAGES
}
_MARK = object()


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a zip-format ``torch.save`` state dict, read without unpickling."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a zip-format torch checkpoint (legacy pickles are not read)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise ValueError(f"{path}: only little-endian checkpoints are read")

        def storage(pid: tuple) -> torch.Tensor:
            if len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], _Global):
                raise ValueError(f"{path}: unexpected persistent id {pid!r}")
            dtype = _STORAGES[pid[1].name]
            raw = bytearray(archive.read(f"{prefix}data/{pid[2]}"))
            return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        return _interpret(archive.read(pkl[0]), storage, str(path))


def _interpret(data: bytes, storage, where: str) -> dict[str, torch.Tensor]:
    stack: list = []
    memo: dict = {}

    def pop_mark() -> list:
        i = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[i + 1 :]
        del stack[i:]
        return items

    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            break
        if name == "GLOBAL":
            module, attr = arg.split(" ", 1)
            if (module, attr) not in _ALLOWED_GLOBALS:
                raise ValueError(f"{where}: refuses the global {module}.{attr} (not part of a state dict)")
            stack.append(_Global(module, attr))
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"):
            stack.append(arg)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "BINFLOAT"):
            stack.append(arg)
        elif name in ("NEWFALSE", "NEWTRUE", "NONE"):
            stack.append({"NEWFALSE": False, "NEWTRUE": True, "NONE": None}[name])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else pop_mark()
            if name == "SETITEM":
                del stack[-2:]
            target = stack[-1]
            for key, value in zip(items[::2], items[1::2]):
                target[key] = value
        elif name == "BINPERSID":
            stack.append(storage(stack.pop()))
        elif name == "REDUCE":
            args = stack.pop()
            fn = stack.pop()
            stack.append(_call(fn, args, where))
        elif name == "BUILD":
            stack.pop()  # the state of the OrderedDict: its _metadata (module versions), not needed
        else:
            raise ValueError(f"{where}: refuses the pickle opcode {name} (not used by a state dict)")
    if len(stack) != 1 or not isinstance(stack[0], dict):
        raise ValueError(f"{where}: the pickle is not a state dict")
    state = stack[0]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {bad[:3]}")
    return state


def _call(fn: object, args: tuple, where: str) -> object:
    """The two calls a state dict makes, implemented here (nothing from the file is called)."""
    if not isinstance(fn, _Global):
        raise ValueError(f"{where}: refuses to call {fn!r}")
    if fn.name == "OrderedDict" and args == ():
        return {}
    if fn.name == "_rebuild_tensor_v2" and 6 <= len(args) <= 7:
        data, offset, size, stride = args[:4]
        return torch.as_strided(data, size, stride, offset).clone()
    raise ValueError(f"{where}: refuses the call {fn.module}.{fn.name}{args!r}")


def convert(source: str | Path, target: str | Path) -> dict[str, torch.Tensor]:
    """Write the state dict of ``source`` to the safetensors file ``target`` (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in read_state_dict(source).items()}
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint written by torch.save (zip format)")
    parser.add_argument("target", help="safetensors file to write")
    args = parser.parse_args(argv)
    state = convert(args.source, args.target)
    for key, value in state.items():
        print(f"{key:24s} {tuple(value.shape)} {value.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
