"""Oracle: safetensors. Files written by HF's safetensors (torch and numpy front ends) load in
qtune with the same names, dtypes, shapes, bytes and metadata, and every file qtune writes (its
writer on those tensors, qtune-convert in fp32/bf16, qtune-quantize) loads with safetensors."""

import json
import os
import struct

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

import oracle

C = oracle.Checks("safetensors")


def as_bits(t):
    """Tensor -> numpy array of its raw bits (bf16 has no numpy dtype)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8)
    return t.numpy()


def foreign_files(d):
    """Files written by safetensors itself: every dtype LibTorch 1.13 has, empty tensors, a
    scalar, non-ASCII names, metadata."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "i64": torch.randint(-2**62, 2**62, (5,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (6,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (3, 1), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (5,), generator=g).bool(),
        "empty": torch.zeros(0),
        "empty_2d": torch.zeros(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "model.layers.0.gewichte_ä.weight": torch.randn(2, 2, generator=g),
        "权重/层.🙂": torch.arange(4, dtype=torch.int32),
    }
    meta = {"format": "pt", "note": "naïve ✓ 数据", "empty": ""}
    pt = os.path.join(d, "from_torch.safetensors")
    safetensors.torch.save_file(tensors, pt, metadata=meta)
    np_tensors = {k: v.numpy() for k, v in tensors.items() if v.dtype != torch.bfloat16}
    npf = os.path.join(d, "from_numpy.safetensors")
    safetensors.numpy.save_file(np_tensors, npf, metadata={"format": "np"})
    return [(pt, meta, tensors), (npf, {"format": "np"},
                                  {k: torch.from_numpy(v) for k, v in np_tensors.items()})]


def round_trip(d):
    for path, meta, tensors in foreign_files(d):
        base = os.path.basename(path)
        out, listing = path + ".qtune.safetensors", path + ".listing.json"
        oracle.helper(cmd="copy_safetensors", **{"in": path}, out=out, listing=listing)
        seen = json.load(open(listing, encoding="utf-8"))
        with safetensors.safe_open(path, framework="pt") as f:
            ref = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
        C.check(f"{base}: qtune reads the same names", sorted(seen["tensors"]) == sorted(ref))
        C.check(f"{base}: qtune reads the same dtypes and shapes",
                all(seen["tensors"][k]["dtype"] == ref[k][0] and
                    seen["tensors"][k]["shape"] == list(ref[k][1]) for k in ref),
                ", ".join(f"{k}:{v['dtype']}{v['shape']}" for k, v in seen["tensors"].items()))
        C.check(f"{base}: qtune reads the metadata", seen["metadata"] == meta)

        back = safetensors.torch.load_file(out)
        C.check(f"{base}: qtune's copy loads with safetensors.torch, same names",
                sorted(back) == sorted(tensors))
        bad = [k for k in tensors if back[k].dtype != tensors[k].dtype or
               back[k].shape != tensors[k].shape or
               not np.array_equal(as_bits(back[k]), as_bits(tensors[k]))]
        C.check(f"{base}: qtune's copy has identical dtypes, shapes and bytes", not bad, str(bad))
        with safetensors.safe_open(out, framework="pt") as f:
            C.check(f"{base}: qtune's copy keeps the metadata", f.metadata() == meta)
        if "bf16" not in tensors:
            nback = safetensors.numpy.load_file(out)
            C.check(f"{base}: qtune's copy loads with safetensors.numpy",
                    all(np.array_equal(nback[k], tensors[k].numpy()) for k in tensors))
        # The header qtune writes: padded with spaces to 8 bytes, as HF's writer pads.
        raw = open(out, "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        C.check(f"{base}: qtune's header is padded to a multiple of 8 bytes", n % 8 == 0, f"{n}")


def llama2c_embedding(path):
    """token_embedding of a llama2.c v0 checkpoint, read straight from the file with numpy."""
    dim, _hidden, _layers, _heads, _kv, vocab, _seq = np.fromfile(path, np.int32, 7)
    return np.fromfile(path, np.float32, abs(vocab) * dim, offset=28).reshape(abs(vocab), dim)


def converted_models(d):
    ckpt = oracle.data_path("stories260K.bin")
    emb = llama2c_embedding(ckpt)
    loaded = {}
    for dtype in ("fp32", "bf16"):
        out = os.path.join(d, f"conv-{dtype}")
        oracle.run("qtune-convert", "--model", ckpt, "--tokenizer",
                   oracle.data_path("tok512.bin"), "--out", out, "--dtype", dtype)
        f = os.path.join(out, "model.safetensors")
        loaded[dtype] = safetensors.torch.load_file(f)
        with safetensors.safe_open(f, framework="pt") as sf:
            C.check(f"qtune-convert {dtype}: metadata format=pt (transformers requires it)",
                    sf.metadata() == {"format": "pt"}, str(sf.metadata()))
        if dtype == "fp32":
            npw = safetensors.numpy.load_file(f)
            C.equal("qtune-convert fp32: embedding (numpy) = the llama2.c floats",
                    npw["model.embed_tokens.weight"], emb)
    a, b = loaded["fp32"], loaded["bf16"]
    C.check("qtune-convert bf16: same tensor names as fp32", sorted(a) == sorted(b))
    bad = [k for k in a if b[k].dtype != torch.bfloat16 or
           not torch.equal(b[k].view(torch.int16), a[k].to(torch.bfloat16).view(torch.int16))]
    C.check("qtune-convert bf16: every tensor = torch's round-to-nearest-even bf16 of fp32",
            not bad, f"{len(a)} tensors; differing: {bad[:5]}")


def quantized_dir(d):
    out = os.path.join(d, "quant-nf4")
    oracle.run("qtune-quantize", "--model", oracle.data_path("stories260K.bin"), "--quant", "nf4",
               "--tokenizer", oracle.data_path("tok512.bin"), "--out", out)
    f = os.path.join(out, "model.safetensors")
    t = safetensors.torch.load_file(f)
    with safetensors.safe_open(f, framework="pt") as sf:
        meta = sf.metadata()
    q = "model.layers.0.self_attn.q_proj"
    C.check("qtune-quantize: loads with safetensors, bitsandbytes key names",
            all(f"{q}.{k}" in t for k in ("weight", "weight.absmax", "weight.quant_map",
                                          "weight.nested_absmax", "weight.nested_quant_map",
                                          "weight.quant_state.bitsandbytes__nf4")))
    js = json.loads(bytes(t[f"{q}.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    C.check("qtune-quantize: quant_state JSON is bitsandbytes' packed form",
            js.get("quant_type") == "nf4" and "nested_offset" in js, str(js))
    C.check("qtune-quantize: state meta in __metadata__", f"qtune:{q}.weight" in meta)


if __name__ == "__main__":
    oracle.versions("safetensors", "torch", "numpy")
    d = oracle.tmpdir("safetensors")
    C.run("files written by safetensors", round_trip, d)
    C.run("qtune-convert output", converted_models, d)
    C.run("qtune-quantize output", quantized_dir, d)
    C.done()
