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

Expected outcome of each file: crates/sd-formats/tests/io_bad_inputs.rs (the tensor readers)
and tests/it/bad_inputs.rs (every tool: exit code, one-line error naming the file and cause, no
panic, no output left behind). The second half of the corpus (issue 12) holds LoRA files that
are valid tensor files but wrong LoRAs, dataset configs, caption and image folders, and gen-img
prompt files.
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

    lora_files()
    dataset_files()
    image_and_caption_folders()
    prompt_files()


# ---------------------------------------------------------------- tool-level inputs (issue 12)

# Module names and shapes of the tiny SD1.5 fixture (tests/fixtures/lora/lora-sd15.modules.json).
TE_K = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
# SDXL LoRAs name U-Net modules by LDM paths and use lora_te1_/lora_te2_.
SDXL_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def ramp(n, scale=0.01, start=1):
    return [scale * ((i + start) % 7 - 3) for i in range(n)]


def lora_module(name, rank, din, dout, alpha=None, dtype="F32", down=None, up=None):
    pack = {"F32": f32, "F16": f16, "BF16": bf16}[dtype]
    t = []
    if alpha is not None:
        t.append((f"{name}.alpha", dtype, [], pack(alpha)))
    t.append((f"{name}.lora_down.weight", dtype, [rank, din], pack(*(down or ramp(rank * din)))))
    t.append((f"{name}.lora_up.weight", dtype, [dout, rank], pack(*(up or ramp(dout * rank, start=3)))))
    return t


def lora_files():
    meta = {"ss_network_module": "networks.lora"}
    write("lora-other-family-sdxl.safetensors",
          st_bytes(lora_module(SDXL_Q, 4, 32, 32, 1.0)
                   + lora_module("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 4, 32, 32, 1.0), meta))
    # LyCORIS LoHa keys (hada_w1_a...): another algorithm, not networks.lora.
    loha = []
    for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        loha.append((f"{UNET_Q}.{k}", "F32", [4, 4], f32(*ramp(16))))
    loha.append((f"{UNET_Q}.alpha", "F32", [], f32(4.0)))
    write("lora-unknown-algorithm-loha.safetensors", st_bytes(loha, {"ss_network_module": "lycoris.kohya"}))
    lokr = [(f"{UNET_Q}.lokr_w1", "F32", [2, 2], f32(1, 2, 3, 4)),
            (f"{UNET_Q}.lokr_w2", "F32", [16, 16], f32(*ramp(256)))]
    write("lora-unknown-algorithm-lokr.safetensors", st_bytes(lokr))
    # Valid: ranks 2 and 4, no alpha tensors at all (alpha = rank, scale 1).
    write("lora-mixed-rank-no-alpha.safetensors",
          st_bytes(lora_module(TE_K, 2, 32, 32) + lora_module(UNET_Q, 4, 32, 32), meta))
    nan_up = ramp(32 * 4)
    nan_up[5] = float("nan")
    nan_up[9] = float("inf")
    write("lora-nan-weights.safetensors", st_bytes(lora_module(UNET_Q, 4, 32, 32, 4.0, up=nan_up), meta))
    write("lora-rank-mismatch.safetensors",
          st_bytes([(f"{UNET_Q}.lora_down.weight", "F32", [4, 32], f32(*ramp(128))),
                    (f"{UNET_Q}.lora_up.weight", "F32", [32, 2], f32(*ramp(64)))], meta))
    write("lora-down-without-up.safetensors",
          st_bytes([(f"{UNET_Q}.alpha", "F32", [], f32(4.0)),
                    (f"{UNET_Q}.lora_down.weight", "F32", [4, 32], f32(*ramp(128)))], meta))
    write("lora-alpha-not-scalar.safetensors",
          st_bytes([(f"{UNET_Q}.alpha", "F32", [2], f32(4.0, 4.0))] + lora_module(UNET_Q, 4, 32, 32)[0:2], meta))
    write("lora-no-tensors.safetensors", st_bytes([], meta))
    # SD1/SD2 text-encoder name (lora_te_) beside an SDXL U-Net name (input_blocks) in one file.
    write("lora-mixed-family-names.safetensors",
          st_bytes(lora_module(TE_K, 4, 32, 32, 1.0) + lora_module(SDXL_Q, 4, 32, 32, 1.0), meta))
    # Right names for the tiny model, full-size SD1.5 shapes (320 channels).
    write("lora-wrong-shape-for-model.safetensors",
          st_bytes(lora_module(UNET_Q, 1, 320, 320, 1.0, dtype="F16",
                               down=[0.01] * 320, up=[0.01] * 320), meta))
    write("lora-integer-dtype.safetensors",
          st_bytes([(f"{UNET_Q}.lora_down.weight", "I64", [1, 2], struct.pack("<2q", 1, 2)),
                    (f"{UNET_Q}.lora_up.weight", "I64", [2, 1], struct.pack("<2q", 1, 2))], meta))
    write("zero-length.ckpt", b"")


def dataset_files():
    def toml_file(name, text):
        write(name, text.encode())

    sub = '[[datasets.subsets]]\nimage_dir = "images"\n'
    toml_file("dataset-wrong-type.toml", '[[datasets]]\nresolution = "big"\n' + sub)
    toml_file("dataset-batch-size-string.toml", '[[datasets]]\nresolution = 64\nbatch_size = "2"\n' + sub)
    toml_file("dataset-unknown-key.toml", '[general]\ncolour_jitter = 3\n[[datasets]]\nresolution = 64\n' + sub)
    toml_file("dataset-unknown-top-level.toml", '[model]\nname = "x"\n[[datasets]]\nresolution = 64\n' + sub)
    toml_file("dataset-syntax-error.toml", '[[datasets]\nresolution = 64\n')
    toml_file("dataset-negative-repeats.toml",
              '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "images"\nnum_repeats = -1\n')
    toml_file("dataset-missing-image-dir.toml",
              '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "no-such-folder-here"\n')
    toml_file("dataset-subsets-not-array.toml", '[[datasets]]\nresolution = 64\nsubsets = "images"\n')
    write("dataset-utf16.toml", '[[datasets]]\nresolution = 64\n'.encode("utf-16"))


# A valid 8x8 PNG (zlib-compressed grey ramp), built without any image library.
def png_bytes(w=8, h=8, header_size=None):
    """header_size: (width, height) written to IHDR (with a valid CRC) instead of (w, h)."""
    import zlib

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + bytes((x * 30 + y * 3) % 256 for x in range(w) for _ in range(3)) for y in range(h))
    hw, hh = header_size or (w, h)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", hw, hh, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def folder(name, files):
    """A DreamBooth-style folder `name/1_tok/` with the given (file name, bytes)."""
    d = os.path.join(ROOT, name, "1_tok")
    os.makedirs(d)
    for fname, data in files:
        with open(os.path.join(d, fname), "wb") as f:
            f.write(data)


def image_and_caption_folders():
    png = png_bytes()
    folder("captions-latin1", [("img.png", png), ("img.txt", "café, naïve".encode("latin-1"))])
    folder("captions-utf16", [("img.png", png), ("img.txt", "a photo, tok".encode("utf-16"))])
    folder("captions-empty-file", [("img.png", png), ("img.txt", b"")])
    folder("captions-binary", [("img.png", png), ("img.txt", b"\x00\xff\xfe\x80 binary")])
    folder("images-truncated-png", [("img.png", png[:40]), ("img.txt", b"tok")])
    folder("images-text-as-jpg", [("img.jpg", b"this is not a jpeg\n"), ("img.txt", b"tok")])
    folder("images-zero-length-png", [("img.png", b""), ("img.txt", b"tok")])
    folder("images-corrupt-idat", [("img.png", png[:45] + b"\xde\xad" * 8 + png[61:]), ("img.txt", b"tok")])
    folder("images-huge-dimensions", [
        ("img.png", png_bytes(header_size=(1 << 30, 1 << 30))), ("img.txt", b"tok")])


def prompt_files():
    def prompts(name, text):
        write(name, text if isinstance(text, bytes) else text.encode())

    prompts("prompts-bad-number.txt", "a cat --w abc --h 64\n")
    prompts("prompts-missing-value.txt", "a cat --n\n")
    prompts("prompts-unknown-option.txt", "a cat --zz 3\n")
    prompts("prompts-negative-steps.txt", "a cat --s -5\n")
    prompts("prompts-zero-size.txt", "a cat --w 0 --h 0\n")
    prompts("prompts-not-utf8.txt", b"a caf\xe9 --n blurry\n")
    prompts("prompts-only-comments.txt", "# nothing to draw\n\n   \n")
    prompts("prompts-unbalanced-attention.txt", "((a cat:1.5 [[dog --l nan\n")


if __name__ == "__main__":
    main()
