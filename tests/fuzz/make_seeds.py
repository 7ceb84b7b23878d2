#!/usr/bin/env python3
"""Writes the small binary seeds of tests/fuzz/seeds/ (kept in git; rerun after a format change):
a tiny safetensors file, a tiny llama2.c checkpoint and tokenizer, a minimal sentencepiece
ModelProto, and a minimal ELF file carrying a PluginStamp. Standard library only."""
import json
import os
import struct
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, name, data):
    os.makedirs(os.path.join(root, target), exist_ok=True)
    with open(os.path.join(root, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: name -> (dtype, shape, bytes)."""
    header, blob = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


f32 = lambda n, v=0.5: struct.pack("<%df" % n, *([v] * n))
put("safetensors", "tiny.safetensors", safetensors({
    "a": ("F32", [2, 3], f32(6)), "b": ("BF16", [4], b"\x80\x3f" * 4), "c": ("I64", [], struct.pack("<q", 7)),
    "d": ("U8", [0], b""), "e": ("BOOL", [2], b"\x01\x00")}, {"format": "pt"}))
put("adapter_config", "lora.bin",
    json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": "x", "task_type": "CAUSAL_LM"}).encode() + b"\0" +
    safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [4, 8], f32(32))},
                {"format": "pt", "qtune": json.dumps({"identity": {"model": "x"}})}))

# llama2.c: dim 8, hidden 16, 1 layer, 2 heads, 1 KV head, vocab 16 (negative: own classifier), seq 4.
dim, hidden, layers, heads, kv, vocab, seq = 8, 16, 1, 2, 1, 16, 4
hs = dim // heads
kvd = kv * hs
n = (vocab * dim + layers * dim + layers * dim * dim + 2 * layers * kvd * dim + layers * dim * dim +
     layers * dim + 3 * layers * hidden * dim + dim + seq * hs)
put("llama2c", "tiny.bin", struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq) + f32(n, 0.01))
put("llama2c", "tiny_own_head.bin",
    struct.pack("<7i", dim, hidden, layers, heads, kv, -vocab, seq) + f32(n + vocab * dim, 0.01))

# tok*.bin: max_token_length, then per token: float score, int32 length, bytes.
# ids 3..258 are the byte tokens <0x00>..<0xFF>, as llama2.c's export writes them.
pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)] + [
    b" ", b"a", b"b", b" a", b"ab", b"\xe2\x96\x81", b"Once", b" upon"]
tok = struct.pack("<i", max(len(p) for p in pieces))
for i, p in enumerate(pieces):
    tok += struct.pack("<fi", -float(i), len(p)) + p
put("tokenizer_bin", "tiny.bin", tok)


# sentencepiece ModelProto: pieces (field 1: {1: piece, 2: score, 3: type}), trainer_spec
# (field 2: {3: model_type BPE=2, 40: unk_id, 41: bos_id, 42: eos_id}), normalizer_spec (field 3).
def varint(v):
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def piece(text, score, kind):
    return field(1, 2, text.encode()) + field(2, 5, struct.pack("<f", score)) + field(3, 0, varint(kind))


spm = b""
for text, score, kind in [("<unk>", 0, 2), ("<s>", 0, 3), ("</s>", 0, 3), ("\u2581", -1, 1), ("a", -2, 1),
                          ("b", -3, 1), ("\u2581a", -4, 1)]:
    spm += field(1, 2, piece(text, score, kind))
# trainer_spec: model_type BPE (3), unk/bos/eos ids (40-42).
spm += field(2, 2, field(3, 0, varint(2)) + field(40, 0, varint(0)) +
             field(41, 0, varint(1)) + field(42, 0, varint(2)))
spm += field(3, 2, field(1, 2, b"identity") + field(3, 0, varint(1)) + field(4, 0, varint(1)))
put("tokenizer_model", "tiny_spm.model", spm)
# tiktoken: "<base64 token> <rank>" lines, every single byte first (byte-level BPE needs them).
import base64
ranks = [bytes([i]) for i in range(256)] + [b"ab", b" a", b" ab", b"Once", b" upon"]
put("tokenizer_model", "tiny_tiktoken.model",
    "".join("%s %d\n" % (base64.b64encode(t).decode(), r) for r, t in enumerate(ranks)))


# tokenizer.json, byte-level BPE: GPT-2's byte-to-unicode map gives every byte a vocabulary entry.
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


u = bytes_to_unicode()
vocab = {"<|endoftext|>": 0}
for b in range(256):
    vocab[u[b]] = len(vocab)
for m in ["a b", "\u0120 a", "\u0120a b"]:
    vocab[m.replace(" ", "")] = len(vocab)
put("tokenizer_json", "tiny_bpe.json", json.dumps({
    "version": "1.0", "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
    "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", "\u0120 a", "\u0120a b"]}}))

# A minimal ELF64 with sections: null, .shstrtab, .qtune_plugin holding a PluginStamp.
stamp = (b"qtune-plugin-v1\0" + struct.pack("<I", 2) + b"quant".ljust(12, b"\0") + b"nf4".ljust(64, b"\0") +
         b"0.1.0".ljust(32, b"\0") + b"1.13.1".ljust(32, b"\0") + b"cxx11".ljust(16, b"\0"))
shstr = b"\0.shstrtab\0.qtune_plugin\0"
ehsize, shentsize = 64, 64
data_off = ehsize
stamp_off = data_off + len(shstr)
shoff = stamp_off + len(stamp)
shoff += -shoff % 8
ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
eh = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 1)
sh = lambda name, typ, off, size: struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
elf = eh + shstr + stamp
elf += b"\0" * (shoff - len(elf))
elf += sh(0, 0, 0, 0) + sh(1, 3, data_off, len(shstr)) + sh(11, 1, stamp_off, len(stamp))
put("plugin_stamp", "tiny.so", elf)
print("seeds written under", root, file=sys.stderr)
