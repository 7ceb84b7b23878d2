"""Oracle: DoRA and PEFT. Adapters trained by qtune with adapter.name=dora load with
PeftModel.from_pretrained (use_dora) on the Hugging Face base and give qtune's logits; PEFT's
merge_and_unload equals `qtune-export --merge`; DoRA adapters written by PEFT (random A, B and
magnitude) load in qtune with PEFT's logits; a QDoRA adapter trained on qtune's NF4 base gives,
on transformers' bitsandbytes 4-bit base, qtune's qlora logits."""

import json
import os

import peft
import safetensors.torch
import torch
import transformers

import oracle

oracle.bnb_generic_cpu_path()

C = oracle.Checks("dora_peft")
ATOL, RTOL = 2e-4, 1e-4
TOKENS = [[1, 45, 300, 12, 7, 99, 256, 3, 17, 400, 22, 81, 5, 60, 61, 62],
          [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 200, 300, 400, 500, 11, 0]]


def hf_base(path):
    return transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def qtune_logits(model, tokens, adapter=None):
    out = os.path.join(oracle.tmpdir("logits"), "logits.safetensors")
    req = dict(cmd="logits", model=model, tokens=tokens, out=out)
    if adapter:
        req["adapter"] = adapter
    oracle.helper(**req)
    return safetensors.torch.load_file(out)["logits"]


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


def train(d, base, name, *extra):
    out = os.path.join(d, name)
    oracle.run("trainer", "--model", base, "--data", oracle.data_path("tinyshakespeare.txt"),
               "--max_steps", "4", "--batch_size", "2", "--seq_len", "32", "--eval_every", "0",
               "--lr", "0.02", "--threads", "1", "--output_dir", out, "train.warmup_steps=0",
               "eval.max_batches=1", "adapter.name=dora", "adapter.options.rank=4",
               "adapter.options.alpha=12", *extra)
    return os.path.join(out, "adapter")


def qtune_dora(d, base):
    adapter = train(d, base, "dora", "--train_type", "lora")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    C.check("adapter_config.json: use_dora true, r 4, lora_alpha 12",
            cfg.get("use_dora") is True and cfg["r"] == 4 and cfg["lora_alpha"] == 12)
    model = peft.PeftModel.from_pretrained(hf_base(base), adapter).eval()
    ref = logits(model, TOKENS)
    C.check("the trained DoRA adapter changes the model",
            float((ref - logits(hf_base(base), TOKENS)).abs().max()) > 1e-3)
    C.close("PeftModel.from_pretrained (DoRA) logits = qtune's", qtune_logits(base, TOKENS, adapter),
            ref, ATOL, RTOL)
    merged_dir = os.path.join(d, "dora-merged")
    oracle.run("qtune-export", "--adapter", adapter, "--model", base, "--merge", "--out",
               merged_dir)
    mine = safetensors.torch.load_file(os.path.join(merged_dir, "model.safetensors"))
    unloaded = model.merge_and_unload()
    theirs = unloaded.state_dict()
    if unloaded.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    C.check("qtune-export --merge = PEFT merge_and_unload (every tensor)", worst <= 1e-5,
            f"max |diff| {worst:.3g}")


def peft_dora(d, base):
    torch.manual_seed(5)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, use_dora=True, r=4,
                          lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(hf_base(base), cfg).eval()
    with torch.no_grad():  # magnitudes away from the row norms too
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    out = os.path.join(d, "peft_dora")
    model.save_pretrained(out)
    ref = logits(model, TOKENS)
    C.check("PEFT's DoRA adapter changes its logits",
            float((ref - logits(hf_base(base), TOKENS)).abs().max()) > 1e-3)
    C.close("a PEFT DoRA adapter loaded in qtune: logits = PEFT's", qtune_logits(base, TOKENS, out),
            ref, ATOL, RTOL)


def qdora(d, base):
    adapter = train(d, base, "qdora", "--train_type", "qlora", "--quant", "nf4",
                    "quant.skip_output=true")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    m4 = transformers.LlamaForCausalLM.from_pretrained(base, quantization_config=cfg,
                                                       device_map="cpu", dtype=torch.float32)
    ref = logits(peft.PeftModel.from_pretrained(m4, adapter).eval(), TOKENS)
    dense = logits(peft.PeftModel.from_pretrained(hf_base(base), adapter).eval(), TOKENS)
    effect = float((dense - ref).abs().max())
    C.check("qdora: 4-bit quantization changes transformers' logits", effect > 0.1,
            f"max |dense - 4-bit| {effect:.3g}")
    C.close("qdora: PeftModel (DoRA) on bitsandbytes' 4-bit base = qtune's qlora logits",
            qtune_logits(base, TOKENS, adapter), ref, 1e-2 * effect)


if __name__ == "__main__":
    oracle.versions("transformers", "peft", "torch")
    d = oracle.tmpdir("dora")
    base = os.path.join(d, "base")
    oracle.run("qtune-convert", "--model", oracle.data_path("stories260K.bin"), "--tokenizer",
               oracle.data_path("tok512.bin"), "--out", base, "--dtype", "fp32")
    C.run("qtune DoRA in PEFT", qtune_dora, d, base)
    C.run("PEFT DoRA in qtune", peft_dora, d, base)
    C.run("QDoRA on bitsandbytes", qdora, d, base)
    C.done()
