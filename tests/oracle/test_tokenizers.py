"""Oracle: tokenizers. qtune's tokenizers give the ids (and the decoded text) of the real
libraries on ../shared/data's tokenizer files and a few MB of real text: sentencepiece for the
Llama 2 .model and its llama2.c .bin export; tiktoken (Llama 3) and HF tokenizers (GPT-2) once
qtune loads those formats. (transformers' LlamaTokenizer converted from the .model is no oracle
for it: HF's converted BPE differs from sentencepiece itself, e.g. on runs of spaces.)

Adding a tokenizer is one line in TOKENIZERS: the file qtune loads and a function building the
reference encoder (text -> ids without BOS/EOS) and decoder (ids -> text)."""

import json
import os

import sentencepiece
import tokenizers

import oracle

C = oracle.Checks("tokenizers")


def sentencepiece_ref(model_file):
    sp = sentencepiece.SentencePieceProcessor(model_file=oracle.data_path(model_file))
    return sp.encode, sp.decode


def tiktoken_llama3_ref(rank_file):
    """tiktoken with Meta's Llama 3 settings (meta-llama/llama3 llama/tokenizer.py): the rank
    file, pat_str, and the 256 special tokens after the ranks."""
    import tiktoken
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(oracle.data_path(rank_file))
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [
        f"<|reserved_special_token_{i}|>" for i in range(4)] + [
        "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
        "<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    enc = tiktoken.Encoding("llama3", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(names)})
    return (lambda t: enc.encode(t, disallowed_special=())), enc.decode


def gpt2_tokenizers_ref(vocab_file, merges_file):
    """HF tokenizers' byte-level BPE on GPT-2's vocab.json + merges.txt."""
    from tokenizers import decoders, models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.BPE.from_file(oracle.data_path(vocab_file),
                                                    oracle.data_path(merges_file)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return (lambda t: tok.encode(t).ids), tok.decode


# (what, file qtune loads, reference).
TOKENIZERS = [
    ("llama2 .model vs sentencepiece", "llama2_tokenizer.model",
     lambda: sentencepiece_ref("llama2_tokenizer.model")),
    ("llama2.c .bin export vs sentencepiece", "llama2_tokenizer.bin",
     lambda: sentencepiece_ref("llama2_tokenizer.model")),
    ("llama3 rank file vs tiktoken", "llama3_tokenizer.model",
     lambda: tiktoken_llama3_ref("llama3_tokenizer.model")),
    ("gpt2 vocab.json + merges.txt vs tokenizers", "gpt2_vocab.json",
     lambda: gpt2_tokenizers_ref("gpt2_vocab.json", "gpt2_merges.txt")),
]


def corpus():
    """Real text: whole lines and paragraphs of the shared data (about 4 MB), plus edge cases."""
    texts = []
    for f in ("tinyshakespeare.txt", "tinystories_val_head.txt"):
        raw = open(oracle.data_path(f), encoding="utf-8").read()
        texts += [p for p in raw.split("\n\n") if p.strip()]
        texts.append(raw)  # and the whole file as one text
    for rec in json.load(open(oracle.data_path("alpaca_sample102.json"), encoding="utf-8")):
        texts += [v for v in rec.values() if v]
    for f in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl"):
        for line in open(oracle.data_path(f), encoding="utf-8"):
            rec = json.loads(line)
            texts.append(rec["instruction"])
            for inst in rec["instances"]:
                texts += [v for v in inst.values() if isinstance(v, str) and v]
    texts += ["naïve café — “quotes”, 数据 and emoji 🙂🚀", "  leading spaces", "trailing  ",
              "tabs\tand\nnewlines\n\n", "0123456789 3.14159 1e-5", "ÅΩ𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a"]
    return texts


def main():
    oracle.versions("sentencepiece", "tokenizers", "tiktoken")
    texts = corpus()
    d = oracle.tmpdir("tok")
    src = oracle.write_json(os.path.join(d, "texts.json"), texts)
    print(f"  corpus: {len(texts)} texts, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB",
          flush=True)
    for what, qfile, make_ref in TOKENIZERS:
        out = os.path.join(d, "ids.json")
        oracle.helper(cmd="tokenize", tokenizer=oracle.data_path(qfile), texts=src, bos=True,
                      eos=True, out=out)
        mine = json.load(open(out, encoding="utf-8"))
        encode, decode = make_ref()
        bos, eos = mine["bos_id"], mine["eos_id"]
        diff = []
        for i, t in enumerate(texts):
            if mine["ids"][i] != [bos] + encode(t) + [eos]:
                diff.append(i)
        C.check(f"{what}: ids (BOS + text + EOS) of every text", not diff,
                f"{len(texts)} texts, {len(diff)} differ" +
                (f", first: {texts[diff[0]][:60]!r}" if diff else ""))
        ddiff = [i for i, t in enumerate(texts)
                 if mine["decoded"][i] != decode(mine["ids"][i][1:-1])]
        C.check(f"{what}: decode of every text = the library's decode", not ddiff,
                f"{len(ddiff)} differ" + (f", first: {mine['decoded'][ddiff[0]][:60]!r} vs "
                                          f"{decode(mine['ids'][ddiff[0]][1:-1])[:60]!r}"
                                          if ddiff else ""))
    C.done()


if __name__ == "__main__":
    main()
