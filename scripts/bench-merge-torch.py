"""PyTorch side of scripts/bench-merge: the same computations as svd-merge-lora and
extract-lora-from-models (written here from the spec, tools.md §3.2 and §4.2), and comparisons
of their outputs.

  svd DIR OUT THREADS                 lora-a + 0.5·lora-b → rank 32 (dense f32 sum, linalg.svd, clamp)
  extract DIR OUT THREADS             tuned − org at dim 32 (f32, linalg.svd, clamp)
  compare-svd TORCH OURS...           ‖P − P_torch‖/‖P_torch‖ per module, P = alpha/rank·up·down
  compare-extract DIR TORCH OURS...   same, plus ‖ΔW − P‖/‖ΔW‖ against the true ΔW
"""

import gzip
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RANK = 32


def modules():
    path = os.path.join(ROOT, "tests", "fixtures", "manifests", "sd15.lora_modules.tsv.gz")
    with gzip.open(path, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    head = rows[0]
    rows = [dict(zip(head, r)) for r in rows[1:]]
    return [r for r in rows if r["parent"] in ("CLIPAttention", "CLIPMLP", "Transformer2DModel")]


def factors(delta, k, q=0.99):
    mat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(k, delta.shape[0], delta.shape[1])
    up = u[:, :k] * s[:k]
    down = vh[:k]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), q)
    up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], k, 1, 1)
        down = down.reshape(k, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), k


def lora_delta(f, name, ratio):
    down = f.get_tensor(name + ".lora_down.weight").float()
    up = f.get_tensor(name + ".lora_up.weight").float()
    r = down.shape[0]
    alpha = f.get_tensor(name + ".alpha").float().item() if name + ".alpha" in f.keys() else r
    d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return (d * (ratio * alpha / r)).reshape(up.shape[0], *down.shape[1:])


def product(f, name):
    down = f.get_tensor(name + ".lora_down.weight").float()
    up = f.get_tensor(name + ".lora_up.weight").float()
    r = down.shape[0]
    alpha = f.get_tensor(name + ".alpha").float().item()
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * (alpha / r)


def svd(d, out):
    a = safe_open(os.path.join(d, "lora-a.safetensors"), "pt")
    b = safe_open(os.path.join(d, "lora-b.safetensors"), "pt")
    names = sorted({k.rsplit(".lora_down", 1)[0] for k in a.keys() if ".lora_down" in k})
    res = {}
    for n in names:
        up, down, k = factors(lora_delta(a, n, 1.0) + lora_delta(b, n, 0.5), RANK)
        res[n + ".lora_up.weight"] = up.half()
        res[n + ".lora_down.weight"] = down.half()
        res[n + ".alpha"] = torch.tensor(k)
    save_file(res, out)


def deltas(d):
    org = safe_open(os.path.join(d, "sd15-org.safetensors"), "pt")
    tuned = safe_open(os.path.join(d, "sd15-tuned.safetensors"), "pt")
    for m in modules():
        key = m["ldm_key"]
        yield m["lora_name"], tuned.get_tensor(key).float() - org.get_tensor(key).float()


def extract(d, out):
    res = {}
    for n, delta in deltas(d):
        up, down, k = factors(delta, RANK)
        res[n + ".lora_up.weight"] = up
        res[n + ".lora_down.weight"] = down
        res[n + ".alpha"] = torch.tensor(float(k))
    save_file(res, out)


def stats(xs):
    xs = sorted(xs)
    return {"median": round(xs[len(xs) // 2], 6), "max": round(xs[-1], 6)}


def compare(ref, ours, d=None):
    t = safe_open(ref, "pt")
    names = sorted({k.rsplit(".lora_down", 1)[0] for k in t.keys() if ".lora_down" in k})
    fs = {o: safe_open(o, "pt") for o in ours}
    vs_torch = {o: [] for o in ours}
    resid = {o: [] for o in [ref] + list(ours)}
    dw = dict(deltas(d)) if d else {}
    for n in names:
        pt = product(t, n)
        for o, f in fs.items():
            vs_torch[o].append(((product(f, n) - pt).norm() / pt.norm().clamp_min(1e-30)).item())
        if n in dw:
            true = dw[n].reshape(pt.shape[0], -1)
            for o, f in [(ref, t)] + list(fs.items()):
                resid[o].append(((true - product(f, n)).norm() / true.norm()).item())
    for o in ours:
        row = {"compare": os.path.basename(o), "vs_torch_rel": stats(vs_torch[o])}
        if dw:
            row["residual_rel"] = stats(resid[o])
        print(json.dumps(row))
    if dw:
        print(json.dumps({"compare": os.path.basename(ref), "residual_rel": stats(resid[ref])}))


def main():
    cmd = sys.argv[1]
    if cmd in ("svd", "extract"):
        torch.set_num_threads(int(sys.argv[4]))
        (svd if cmd == "svd" else extract)(sys.argv[2], sys.argv[3])
    elif cmd == "compare-svd":
        compare(sys.argv[2], sys.argv[3:])
    elif cmd == "compare-extract":
        compare(sys.argv[3], sys.argv[4:], sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
