"""Oracle: bitsandbytes NF4. qtune's nf4 plugin and bitsandbytes.functional.quantize_4bit
(quant_type="nf4", on the CPU) quantize the same matrices (random, heavy-tailed, outliers, odd
sizes, bf16; block sizes 32..4096, with and without double quantization) to the same bytes:
packed codes, fp32 absmax, NF4 table; with double quantization the offset and the dynamic code
table agree to a few ulp (torch computes them in fp32 with an order that varies) and, on the same
offset and table, the absmax codes and nested absmax equal quantize_blockwise's. Both directions
of the checkpoint interchange are exact: bitsandbytes dequantizes qtune's state (through
QuantState.from_dict, the path transformers loads 4-bit layers with) to qtune's values, and qtune
loads bitsandbytes' state (as Linear4bit saves it) and dequantizes to dequantize_4bit's values."""

import json
import os

import bitsandbytes
import bitsandbytes.functional as bnbf
import safetensors.torch
import torch

import oracle

C = oracle.Checks("bnb_nf4")
BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
NEARER, TOTAL = [], []  # absmax codes where bitsandbytes' binary search missed the nearest
KERNEL_OFF = []  # cases where bitsandbytes' CPU kernel did not decode its own codes


def nf4_definition(q, st):
    """What a 4-bit state decodes to by definition: each block's codes looked up in the table and
    scaled by the block's absmax (itself decoded first under double quantization), over the
    flattened matrix, high nibble first: bitsandbytes' own portable formula (its default
    backend, "matches C++ / CUDA behavior")."""
    absmax = st.absmax
    if st.nested:
        absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    n = 1
    for d in st.shape:
        n *= d
    b = q.view(torch.uint8).reshape(-1).long()
    idx = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    scale = absmax.float().repeat_interleave(st.blocksize)[:n]
    return (st.code.float()[idx] * scale).reshape(st.shape).to(st.dtype).float()


def bnb_dequantize(q, st, tag):
    """bitsandbytes' dequantize_4bit. Where its CPU kernel does not give the definition's values,
    the definition, and the case is reported: bitsandbytes 0.50's AVX-512 kernel mis-decodes
    blocks that cross a row (row length not a multiple of the block size; measured on an Intel
    Xeon with AVX-512F, fine on an AMD EPYC without it), and it falls back to the portable
    formula itself for blocks >= 2048 (bitsandbytes PR #1828, a related AVX-512 accuracy fix)."""
    out = bnbf.dequantize_4bit(q, st).float()
    ref = nf4_definition(q, st)
    if torch.equal(out, ref):
        return out
    KERNEL_OFF.append(tag)
    return ref


def matrices():
    g = torch.Generator().manual_seed(7)
    t = torch.distributions.StudentT(torch.tensor(2.0))
    torch.manual_seed(7)
    outliers = torch.randn(48, 96, generator=g)
    outliers.view(-1)[::397] *= 80.0
    return {
        "gaussian_64x256": torch.randn(64, 256, generator=g),
        "student_t2_33x97": t.sample((33, 97)),          # heavy tails, odd element count
        "outliers_48x96": outliers,
        "odd_1x7": torch.randn(1, 7, generator=g),
        "odd_5x13": torch.randn(5, 13, generator=g) * 1e-3,
        "long_3x4099": torch.randn(3, 4099, generator=g),  # > 4096 and a short last block
        "bf16_16x96": torch.randn(16, 96, generator=g).to(torch.bfloat16),
    }


def ulps(a, b):
    """Distance in units in the last place between fp32 tensors."""
    ia = a.float().contiguous().view(torch.int32).long()
    ib = b.float().contiguous().view(torch.int32).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def compare(mats, res, i, bs, dq, back):
    for name, w in mats.items():
        tag = f"{name} block {bs} {'dq' if dq else 'no-dq'}"
        p = f"{i}/{name}/"
        q, st = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
        C.equal(f"{tag}: codes", res[p + "weight"], q)
        C.equal(f"{tag}: NF4 code table", res[p + "weight.quant_map"], st.code)
        # bitsandbytes dequantizes to the input's dtype (QuantState.dtype): compare in it.
        deq = res[p + "dequant"].to(w.dtype).float()
        if dq:
            qs = json.loads(bytes(res[p + "weight.quant_state.bitsandbytes__nf4"].tolist()))
            offset = torch.tensor(qs["nested_offset"], dtype=torch.float32)
            # offset = mean(absmax): qtune sums in double, torch in fp32 (order varies).
            C.check(f"{tag}: offset = bitsandbytes' within 8 ulp", ulps(offset, st.offset) <= 8,
                    f"{ulps(offset, st.offset)} ulp")
            table = res[p + "weight.nested_quant_map"]
            # The table is torch.linspace in fp32, whose last bits vary between torch versions.
            C.check(f"{tag}: nested code table = bitsandbytes' within 4 ulp",
                    ulps(table, st.state2.code) <= 4, f"{ulps(table, st.state2.code)} ulp")
            # The nested step on the same input: absmax - qtune's offset, qtune's table.
            _, plain = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=False,
                                          quant_type="nf4")
            x = plain.absmax - offset
            qa, st2 = bnbf.quantize_blockwise(x, code=table, blocksize=256)
            C.equal(f"{tag}: nested absmax = quantize_blockwise's", res[p + "weight.nested_absmax"],
                    st2.absmax)
            # qtune codes each centred absmax as the nearest table entry; bitsandbytes' CPU
            # binary search sometimes ends one entry off. Every difference must be such a case,
            # or a nested block whose absmax is 0 (any code then decodes to the offset).
            mine = res[p + "weight.absmax"].long()
            a2 = st2.absmax.repeat_interleave(256)[:x.numel()]
            scaled = x * (1.0 / a2)
            dm, db = (table[mine] - scaled).abs(), (table[qa.long()] - scaled).abs()
            differ = mine != qa.long()
            explained = differ & ((a2 == 0) | (dm < db))
            C.check(f"{tag}: absmax codes = quantize_blockwise's, or nearer to the value",
                    bool((explained == differ).all()),
                    f"{int(differ.sum())} of {x.numel()} differ, all with qtune's nearer or a "
                    f"zero nested absmax" if bool((explained == differ).all()) else
                    f"unexplained at {(differ & ~explained).nonzero().flatten().tolist()[:5]}")
            NEARER.append(int((differ & (a2 != 0)).sum()))
            TOTAL.append(x.numel())
        else:
            C.equal(f"{tag}: absmax (fp32)", res[p + "weight.absmax"], st.absmax)
            C.equal(f"{tag}: dequantize = dequantize_4bit", deq, bnb_dequantize(q, st, tag))
        # bitsandbytes reading qtune's state, as transformers does for a saved 4-bit layer.
        state = {k[len(p):]: v for k, v in res.items() if k.startswith(p) and k != p + "dequant"}
        qst = bnbf.QuantState.from_dict({k: v for k, v in state.items() if k != "weight"},
                                        torch.device("cpu"))
        mine = bnb_dequantize(state["weight"], qst, tag + " (qtune's state)")
        C.equal(f"{tag}: bitsandbytes dequantizes qtune's state to qtune's values", mine, deq)
        # qtune reading bitsandbytes' state (as Linear4bit saves it) and dequantizing.
        C.equal(f"{tag}: qtune loads bitsandbytes' state and dequantizes to its values",
                back[f"{i}-{name}/dequant"].to(w.dtype).float(), bnb_dequantize(q, st, tag))


def bnb_states(mats, sets, path):
    """bitsandbytes' own states, saved the way Linear4bit saves them (weight + weight.<key>)."""
    out = {}
    for i, (bs, dq) in enumerate(sets):
        for name, w in mats.items():
            q, st = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
            out[f"{i}-{name}/weight"] = q
            for k, v in st.as_dict(packed=True).items():
                out[f"{i}-{name}/weight.{k}"] = v
    safetensors.torch.save_file(out, path)


def zero_block():
    """An all-zero block: both give code 7 (NF4 0.0) and exact zeros."""
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    d = oracle.tmpdir("nf4z")
    safetensors.torch.save_file({"w": w}, os.path.join(d, "in.safetensors"))
    oracle.helper(cmd="quantize", backend="nf4", options={"block_size": 64, "double_quant": False},
                  **{"in": os.path.join(d, "in.safetensors")}, out=os.path.join(d, "out.safetensors"))
    res = safetensors.torch.load_file(os.path.join(d, "out.safetensors"))
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    C.equal("all-zero block: codes", res["w/weight"], q)
    C.check("all-zero block: both dequantize to exact zeros",
            bool((res["w/dequant"][0] == 0).all() and
                 (bnb_dequantize(q, st, "all-zero block")[0] == 0).all()))


def main():
    oracle.versions("bitsandbytes", "torch")
    print(f"  bitsandbytes quantize_4bit on {torch.ops.bitsandbytes.quantize_4bit.default}", flush=True)
    mats = matrices()
    d = oracle.tmpdir("nf4")
    src = os.path.join(d, "in.safetensors")
    safetensors.torch.save_file(mats, src)
    sets = [(bs, dq) for bs in BLOCKS for dq in (False, True)]
    out = os.path.join(d, "out.safetensors")
    info = oracle.helper(cmd="quantize", backend="nf4", **{"in": src}, out=out,
                         options=[{"block_size": bs, "double_quant": dq,
                                   "double_quant_block_size": 256} for bs, dq in sets])
    print(f"  qtune nf4 plugin {info['plugin_version']}", flush=True)
    res = safetensors.torch.load_file(out)
    theirs, back = os.path.join(d, "bnb.safetensors"), os.path.join(d, "back.safetensors")
    bnb_states(mats, sets, theirs)
    oracle.helper(cmd="dequantize", backend="nf4", **{"in": theirs}, out=back)
    back = safetensors.torch.load_file(back)
    for i, (bs, dq) in enumerate(sets):
        C.run(f"block {bs} dq {dq}", compare, mats, res, i, bs, dq, back)
    C.run("zero block", zero_block)
    print(f"  double quantization: {sum(NEARER)} of {sum(TOTAL)} absmax codes differ from "
          f"bitsandbytes', each one where bitsandbytes' pick is not the nearest table entry")
    # The definition stands in only for the kernel's own defect: it must agree with the kernel
    # wherever the blocks do not cross a row, which every matrix here has at some block size.
    C.check("bitsandbytes' CPU kernel gives the definition's values where blocks stay in a row",
            not any(" block 32 " in t for t in KERNEL_OFF), ", ".join(KERNEL_OFF[:3]))
    print(f"  bitsandbytes' CPU dequantize_4bit differed from the NF4 definition in "
          f"{len(KERNEL_OFF)} cases (compared with the definition there): "
          f"{', '.join(KERNEL_OFF[:4])}{' ...' if len(KERNEL_OFF) > 4 else ''}")
    C.done()


if __name__ == "__main__":
    main()
