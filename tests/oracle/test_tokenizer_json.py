"""Oracle: the tokenizer.json (+ tokenizer_config.json) qtune writes opens in the stock tools and
gives the source tokenizer's ids. For each tokenizer of ../shared/data, qtune-convert writes an HF
directory; HF `tokenizers` loads its tokenizer.json and transformers' AutoTokenizer the directory,
and both must give, on a few MB of real text, the ids qtune computes from the source file (the
llama2.c export and the sentencepiece model through the sentencepiece-style BPE with byte
fallback qtune writes; Llama 3's tiktoken ranks and GPT-2's vocab.json + merges.txt as
byte-level BPE). test_tokenizers.py checks the source files themselves against sentencepiece,
tiktoken and tokenizers."""

import json
import os

import tokenizers
import transformers

import oracle
from test_tokenizers import corpus

C = oracle.Checks("tokenizer_json")

SOURCES = ["tok512.bin", "llama2_tokenizer.model", "llama3_tokenizer.model", "gpt2_vocab.json"]


def check_source(src, texts, texts_file, d):
    out_dir = os.path.join(d, src.replace(".", "_"))
    oracle.run("qtune-convert", "--model", oracle.data_path("stories260K.bin"), "--tokenizer",
               oracle.data_path(src), "--out", out_dir)
    ids_file = os.path.join(d, "ids.json")
    # With BOS, so qtune's decode drops the dummy-prefix space as HF's Strip decoder does at the
    # start; the BOS itself is then taken off the ids.
    oracle.helper(cmd="tokenize", tokenizer=oracle.data_path(src), texts=texts_file, bos=True,
                  eos=False, out=ids_file)
    mine = json.load(open(ids_file, encoding="utf-8"))
    if mine["bos_id"] >= 0:
        mine["ids"] = [ids[1:] for ids in mine["ids"]]

    hf = tokenizers.Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    theirs = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    diff = [i for i in range(len(texts)) if theirs[i] != mine["ids"][i]]
    C.check(f"{src}: tokenizers.Tokenizer(tokenizer.json) ids = qtune's ids of {src}", not diff,
            f"{len(texts)} texts, {len(diff)} differ" +
            (f", first: {texts[diff[0]][:60]!r}" if diff else ""))
    ddiff = [i for i in range(len(texts)) if hf.decode(mine["ids"][i]) != mine["decoded"][i]]
    C.check(f"{src}: tokenizers decode = qtune's decode", not ddiff,
            f"{len(ddiff)} differ" + (f", first: {texts[ddiff[0]][:60]!r}" if ddiff else ""))

    # transformers reads the directory (tokenizer.json + tokenizer_config.json): BOS/EOS and
    # add_bos_token as qtune reports them.
    auto = transformers.AutoTokenizer.from_pretrained(out_dir)
    C.check(f"{src}: AutoTokenizer BOS/EOS ids = qtune's",
            (auto.bos_token_id if auto.bos_token_id is not None else -1,
             auto.eos_token_id if auto.eos_token_id is not None else -1)
            == (mine["bos_id"], mine["eos_id"]),
            f"{auto.bos_token_id}/{auto.eos_token_id} vs {mine['bos_id']}/{mine['eos_id']}")
    sample = [i for i in range(min(200, len(texts))) if texts[i].strip()]
    cfg = json.load(open(os.path.join(out_dir, "tokenizer_config.json"), encoding="utf-8"))
    bos = [mine["bos_id"]] if cfg["add_bos_token"] and mine["bos_id"] >= 0 else []
    bad = [i for i in sample if auto(texts[i])["input_ids"] != bos + mine["ids"][i]]
    C.check(f"{src}: AutoTokenizer(dir)(text) = BOS + qtune's ids", not bad,
            f"{len(sample)} texts, {len(bad)} differ" +
            (f", first: {texts[bad[0]][:60]!r}" if bad else ""))


def main():
    oracle.versions("tokenizers", "transformers")
    texts = corpus()
    d = oracle.tmpdir("tokjson")
    texts_file = oracle.write_json(os.path.join(d, "texts.json"), texts)
    print(f"  corpus: {len(texts)} texts, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB",
          flush=True)
    for src in SOURCES:
        C.run(src, check_source, src, texts, texts_file, d)
    C.done()


if __name__ == "__main__":
    main()
