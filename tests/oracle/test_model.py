"""Oracle: the model. qtune's logits equal transformers' on the same tokens, in fp32: for the
llama2.c stories260K (converted with qtune-convert, and read from the .bin directly) and for
small random models that transformers itself writes (Llama with grouped-query attention and a
non-default rope_theta, tied embeddings, bf16 weights, sharded safetensors; Mistral)."""

import os

import safetensors.torch
import torch
import transformers

import oracle

C = oracle.Checks("model")
# fp32 on both sides; the two differ only in summation order (matmul blocking, softmax).
ATOL, RTOL = 2e-4, 1e-4


def hf_logits(path, tokens):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits


def qtune_logits(model, tokens, **extra):
    d = oracle.tmpdir("logits")
    out = os.path.join(d, "logits.safetensors")
    oracle.helper(cmd="logits", model=model, tokens=tokens, out=out, **extra)
    return safetensors.torch.load_file(out)["logits"]


def random_tokens(vocab, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (batch, length), generator=g)
    t[:, 0] = 1
    return t.tolist()


def stories260k():
    d = oracle.tmpdir("stories")
    hf = os.path.join(d, "hf")
    ckpt = oracle.data_path("stories260K.bin")
    oracle.run("qtune-convert", "--model", ckpt, "--tokenizer", oracle.data_path("tok512.bin"),
               "--out", hf, "--dtype", "fp32")
    tokens = random_tokens(512, 2, 48, seed=3)
    ref = hf_logits(hf, tokens)
    C.close("stories260K (qtune-convert): qtune logits = transformers", qtune_logits(hf, tokens),
            ref, ATOL, RTOL)
    C.close("stories260K (.bin read directly): qtune logits = transformers",
            qtune_logits(ckpt, tokens), ref, ATOL, RTOL)


def random_model(d, name, cls, config, dtype=torch.float32, shard=None):
    torch.manual_seed(11)
    m = cls(config)
    with torch.no_grad():  # norms away from 1 so that their weights matter
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = os.path.join(d, name)
    kwargs = {"max_shard_size": shard} if shard else {}
    m.to(dtype).save_pretrained(path, **kwargs)
    return path


def random_models():
    d = oracle.tmpdir("random")
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=96, max_position_embeddings=128,
                rms_norm_eps=1e-5, initializer_range=0.2)
    L, M = transformers.LlamaConfig, transformers.MistralConfig
    cases = [
        ("llama_gqa_theta5e5", transformers.LlamaForCausalLM,
         L(**base, num_key_value_heads=2, rope_theta=500000.0), torch.float32, None),
        ("llama_tied_mha", transformers.LlamaForCausalLM,
         L(**base, num_key_value_heads=4, tie_word_embeddings=True), torch.float32, None),
        ("llama_bf16_sharded", transformers.LlamaForCausalLM,
         L(**base, num_key_value_heads=1), torch.bfloat16, "40KB"),
        ("mistral_gqa", transformers.MistralForCausalLM,
         M(**base, num_key_value_heads=2, sliding_window=None), torch.float32, None),
    ]
    for i, (name, cls, cfg, dtype, shard) in enumerate(cases):
        path = random_model(d, name, cls, cfg, dtype, shard)
        if shard:
            C.check(f"{name}: transformers wrote shards",
                    os.path.exists(os.path.join(path, "model.safetensors.index.json")))
        tokens = random_tokens(96, 2, 40, seed=20 + i)
        C.close(f"{name}: qtune logits = transformers' {cls.__name__}",
                qtune_logits(path, tokens), hf_logits(path, tokens), ATOL, RTOL)


if __name__ == "__main__":
    oracle.versions("transformers", "torch")
    C.run("stories260K", stories260k)
    C.run("random models", random_models)
    C.done()
