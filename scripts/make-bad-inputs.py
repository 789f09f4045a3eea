#!/usr/bin/env python3
"""Writes tests/bad-inputs/: small malformed (and a few unusual but valid) tensor files.

Plain python3 (3.8+), no torch, no safetensors package: every file is assembled byte by byte
so the corpus documents the formats it breaks. Deterministic: a second run writes identical
bytes (fixed zip timestamps, no randomness).

    python3 scripts/make-bad-inputs.py            # writes tests/bad-inputs/

The PyTorch checkpoints follow the layout torch.save (>= 1.6) writes, checked against
tests/fixtures/tiny-sd15.ckpt: a zip with <archive>/data.pkl (protocol 2 pickle; tensors are
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks) with
storages as persistent ids ('storage', torch.<X>Storage, key, 'cpu', numel)),
<archive>/data/<key> (raw little-endian bytes), <archive>/byteorder and <archive>/version.
To emit the torch globals without torch, fake `torch` modules are registered in sys.modules;
nothing from them is ever called at load time by our reader.

Expected outcome of each file: crates/sd-formats/tests/io_bad_inputs.rs.
"""

import collections
import io
import json
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "bad-inputs")
PWNED = "/tmp/sd-formats-bad-input-pwned"

# ---------------------------------------------------------------- safetensors helpers


def st_bytes(tensors, metadata=None, header_override=None, length_override=None):
    """tensors: list of (name, dtype, shape, raw bytes) in data order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    if header_override is not None:
        header = header_override(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    n = len(h) if length_override is None else length_override
    return struct.pack("<Q", n) + h + data


def f32(*xs):
    return struct.pack("<%df" % len(xs), *xs)


def f16(*xs):
    return struct.pack("<%de" % len(xs), *xs)


def bf16(*xs):
    return b"".join(struct.pack("<f", x)[2:] for x in xs)


def write(name, data):
    with open(os.path.join(ROOT, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- fake torch for pickling


def fake_module(name):
    m = types.ModuleType(name)
    sys.modules[name] = m
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, m)
    return m


torch = fake_module("torch")
torch_utils = fake_module("torch._utils")


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called")


def _rebuild_parameter(*args):
    raise RuntimeError("never called")


for fn, mod in [(_rebuild_tensor_v2, torch_utils), (_rebuild_parameter, torch_utils)]:
    fn.__module__ = mod.__name__
    setattr(mod, fn.__name__, fn)

STORAGE = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage", "I64": "LongStorage"}
ELEM = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
for cls_name in STORAGE.values():
    setattr(torch, cls_name, type(cls_name, (), {"__module__": "torch"}))


class Storage:
    def __init__(self, key, dtype, raw):
        self.key, self.dtype, self.raw = key, dtype, raw

    @property
    def numel(self):
        return len(self.raw) // ELEM[self.dtype]


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2, self.args)


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, proto):
        return (_rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


def contiguous(storage, shape):
    stride, acc = [], 1
    for d in reversed(shape):
        stride.insert(0, acc)
        acc *= d
    return Tensor(storage, 0, shape, stride)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class LegacyPickler(pickle.Pickler):
    """torch < 1.6 persistent ids carry a sixth item, view metadata (None)."""

    def __init__(self, f, seen):
        super().__init__(f, protocol=2)
        self.seen = seen

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.seen.setdefault(obj.key, obj)
            return ("storage", getattr(torch, STORAGE[obj.dtype]), obj.key, "cpu", obj.numel, None)
        return None


def legacy_save(obj):
    """The pre-zip torch.save layout (torch/serialization.py, _legacy_save)."""
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    seen = {}
    LegacyPickler(out, seen).dump(obj)
    keys = sorted(seen)
    pickle.dump(keys, out, protocol=2)
    for k in keys:
        out.write(struct.pack("<q", seen[k].numel))
        out.write(seen[k].raw)
    return out.getvalue()


def torch_zip(obj=None, storages=(), archive="archive", pkl=None, deflate=(), byteorder=b"little",
              skip_pkl=False, extra=()):
    if pkl is None:
        buf = io.BytesIO()
        TorchPickler(buf, protocol=2).dump(obj)
        pkl = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        def add(name, data, compress=zipfile.ZIP_STORED):
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            info.external_attr = 0o644 << 16
            z.writestr(info, data)

        if not skip_pkl:
            add("data.pkl", pkl)
        add("byteorder", byteorder)
        for s in storages:
            add(f"data/{s.key}", s.raw, zipfile.ZIP_DEFLATED if s.key in deflate else zipfile.ZIP_STORED)
        for name, data in extra:
            add(name, data)
        add("version", b"3\n")
    return out.getvalue()


# ---------------------------------------------------------------- objects for checkpoints

# Lightning-like callback: a class from a module the reader does not know, pickled with
# NEWOBJ + BUILD (protocol 2), holding floats, None, bytes (pickled via _codecs.encode).
lightning = fake_module("pytorch_lightning")
lightning_cb = fake_module("pytorch_lightning.callbacks")


class ModelCheckpoint:
    pass


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks"
lightning_cb.ModelCheckpoint = ModelCheckpoint


def model_checkpoint():
    cb = ModelCheckpoint()
    cb.__dict__.update({"monitor": None, "best_model_score": 0.25, "dirpath": b"/logs/ckpt", "save_top_k": 1})
    return cb


class SystemCall:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + PWNED,))


evil = fake_module("evil_module")


def evil_run(*args):
    raise RuntimeError("never called")


evil_run.__module__ = "evil_module"
evil_run.__name__ = evil_run.__qualname__ = "run"
evil.run = evil_run


class UnknownModuleCall:
    def __reduce__(self):
        return (evil_run, ("payload",))


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)

    good = [("a", "F32", [2], f32(1.0, 2.0)), ("b", "F16", [2, 2], f16(1, 2, 3, 4))]
    full = st_bytes(good, {"k": "v"})

    # --- safetensors
    write("truncated.safetensors", full[:-5])
    write("zero-length.safetensors", b"")
    write("header-too-short.safetensors", b"\x10\x00\x00")
    write("header-longer-than-file.safetensors", st_bytes(good, length_override=1000)[:64])
    # A real length field of 120 MB (over the 100 MB cap of the safetensors packages); the file
    # itself stays small: the cap must be reported before the missing bytes.
    write("header-over-limit.safetensors", struct.pack("<Q", 120_000_000) + b'{"__metadata__":{"x":"')

    def overlap(h):
        h["b"]["data_offsets"] = [4, 12]
        return h

    write("overlapping-offsets.safetensors", st_bytes(good, header_override=overlap)[:-4])

    def past_end(h):
        h["b"]["data_offsets"] = [12, 20]  # the data section has 16 bytes
        return h

    write("offsets-past-end.safetensors", st_bytes(good, header_override=past_end))

    def gap(h):
        h["a"]["data_offsets"] = [0, 8]
        h["b"]["data_offsets"] = [12, 20]
        return h

    write("gap-in-data.safetensors", st_bytes(good, header_override=gap) + b"\0" * 4)  # 20 data bytes
    write("unknown-dtype.safetensors", st_bytes([("a", "F12", [2], f32(1, 2))]))
    write("float8-dtype.safetensors", st_bytes([("a", "F8_E4M3", [2], b"\x01\x02")]))
    write("shape-length-mismatch.safetensors", st_bytes([("a", "F32", [3], f32(1, 2))]))
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]'  # missing closing brace
    h += b" " * (-len(h) % 8)
    write("invalid-json.safetensors", struct.pack("<Q", len(h)) + h + f32(1.0))
    write("metadata-not-strings.safetensors", st_bytes(good, {"ss_network_dim": 4}))
    write(
        "nan-inf.safetensors",
        st_bytes(
            [
                ("finite", "F32", [2], f32(1.0, -2.0)),
                ("inf_bf16", "BF16", [2], bf16(1.0, float("-inf"))),
                ("nan_f16", "F16", [3], f16(0.5, float("nan"), 2.0)),
                ("nan_f32", "F32", [1], f32(float("nan"))),
            ],
            {"note": "NaN/Inf tensors are readable"},
        ),
    )
    write("plain-text.safetensors", b"this is a text file, not a tensor file\nsecond line\n")
    os.makedirs(os.path.join(ROOT, "folder.safetensors"))
    write("folder.safetensors/README", b"a directory passed where a tensor file is expected\n")

    # --- checkpoints
    s0 = Storage("0", "F32", f32(*range(6)))
    sd = collections.OrderedDict(w=contiguous(s0, [2, 3]))
    ok_zip = torch_zip({"state_dict": sd}, [s0])
    write("truncated-zip.ckpt", ok_zip[: len(ok_zip) // 2])
    write("zip-without-data-pkl.ckpt", torch_zip(storages=[s0], pkl=b"", skip_pkl=True))
    write("os-system.ckpt", torch_zip(SystemCall()))
    write("unknown-module.ckpt", torch_zip({"state_dict": UnknownModuleCall()}))
    write("missing-storage.ckpt", torch_zip({"state_dict": sd}, []))
    s_small = Storage("0", "F32", f32(1, 2))
    write("view-past-storage.ckpt", torch_zip({"w": Tensor(s_small, 1, [2], [1])}, [s_small]))
    write("big-endian.ckpt", torch_zip({"state_dict": sd}, [s0], byteorder=b"big"))
    write("bad-opcode.ckpt", torch_zip(pkl=b"\x80\x02}q\x00\xff."))
    write("no-tensors.ckpt", torch_zip({"epoch": 3, "global_step": 10}))
    # A bare pickle (no zip) calling os.system, and the pre-1.6 legacy header.
    write("raw-pickle-os-system.pt", pickle.dumps(SystemCall(), protocol=2))
    legacy = legacy_save(
        collections.OrderedDict(
            [("w", contiguous(Storage("0", "F32", f32(1, 2, 3, 4)), [2, 2])),
             ("b", contiguous(Storage("1", "F16", f16(0.5, -1)), [2]))]
        )
    )
    write("legacy-tensors.pt", legacy)
    write("legacy-truncated.pt", legacy[:-3])

    # --- valid checkpoints with unusual content
    # Lightning layout: state_dict beside epoch, global_step and callback objects.
    w = Storage("0", "F16", f16(1, 2, 3, 4, 5, 6))
    b = Storage("1", "F32", f32(0.5, -0.5))
    step = Storage("2", "I64", struct.pack("<q", 7))
    ckpt = {
        "epoch": 1,
        "global_step": 100,
        "pytorch-lightning_version": "1.9.0",
        "callbacks": {ModelCheckpoint: model_checkpoint()},
        "state_dict": collections.OrderedDict(
            [
                ("model.diffusion_model.out.2.weight", contiguous(w, [2, 3])),
                ("model.diffusion_model.out.2.bias", Parameter(contiguous(b, [2]))),
                ("model.num_steps", contiguous(step, [])),
            ]
        ),
        "optimizer_states": [{"lr": 1e-4}],
    }
    write("lightning-callbacks.ckpt", torch_zip(ckpt, [w, b, step], archive="lightning"))

    # Views sharing one storage (transposed, offset), a bf16 storage and a deflated entry.
    base = Storage("0", "F32", f32(*range(12)))
    bf = Storage("1", "BF16", bf16(1.0, 2.0, 3.0, 4.0))
    packed = Storage("2", "F32", f32(10, 20, 30, 40))
    views = collections.OrderedDict(
        [
            ("full", contiguous(base, [3, 4])),
            ("transposed", Tensor(base, 0, [4, 3], [1, 4])),
            ("row2", Tensor(base, 8, [4], [1])),
            ("col1", Tensor(base, 1, [3], [4])),
            ("bf16", contiguous(bf, [2, 2])),
            ("deflated", contiguous(packed, [2, 2])),
            ("deflated_t", Tensor(packed, 0, [2, 2], [1, 2])),
            ("empty", Tensor(base, 0, [0, 4], [4, 1])),
        ]
    )
    write("strided-views.ckpt", torch_zip(views, [base, bf, packed], deflate={"2"}))


if __name__ == "__main__":
    main()
