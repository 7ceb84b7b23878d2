"""Oracle: PEFT, qtune's adapters. Adapters trained by qtune's trainer (LoRA and rsLoRA, kaiming
and gaussian init) load with PeftModel.from_pretrained on the Hugging Face base and give qtune's
logits; PEFT's merge_and_unload equals `qtune-export --merge`. (test_peft_foreign.py: adapters
written by PEFT, and QLoRA on bitsandbytes' 4-bit base.)"""

import json
import os

import peft
import safetensors.torch
import torch
import transformers

import oracle

C = oracle.Checks("peft")
ATOL, RTOL = 2e-4, 1e-4


def hf_base(path):
    m = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                      attn_implementation="eager")
    return m.eval()


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


TOKENS = [[1, 45, 300, 12, 7, 99, 256, 3, 17, 400, 22, 81, 5, 60, 61, 62],
          [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 200, 300, 400, 500, 11, 0]]

VARIANTS = [  # (name, adapter.options overrides, PEFT fields expected in adapter_config.json)
    ("lora_kaiming", {"init": "kaiming"}, {"use_rslora": False, "init_lora_weights": True}),
    ("lora_gaussian", {"init": "gaussian"}, {"use_rslora": False,
                                             "init_lora_weights": "gaussian"}),
    ("rslora_kaiming", {"init": "kaiming", "use_rslora": True}, {"use_rslora": True}),
    ("rslora_gaussian", {"init": "gaussian", "use_rslora": True},
     {"use_rslora": True, "init_lora_weights": "gaussian"}),
]


def train(d, base, name, options):
    out = os.path.join(d, name)
    args = ["--model", base, "--train_type", "lora", "--data",
            oracle.data_path("tinyshakespeare.txt"), "--max_steps", "3", "--batch_size", "2",
            "--seq_len", "32", "--eval_every", "0", "--lr", "0.02", "--threads", "1",
            "--output_dir", out, "train.warmup_steps=0", "eval.max_batches=1",
            "adapter.options.rank=4", "adapter.options.alpha=12"]
    args += [f"adapter.options.{k}={str(v).lower()}" for k, v in options.items()]
    oracle.run("trainer", *args)
    return os.path.join(out, "adapter")


def qtune_adapters(d, base):
    for name, options, fields in VARIANTS:
        adapter = train(d, base, name, options)
        cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
        C.check(f"{name}: adapter_config.json has PEFT's fields",
                all(cfg.get(k) == v for k, v in fields.items()) and cfg["r"] == 4 and
                cfg["lora_alpha"] == 12, json.dumps({k: cfg.get(k) for k in fields}))
        model = peft.PeftModel.from_pretrained(hf_base(base), adapter).eval()
        b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        C.check(f"{name}: trained lora_B is not zero (the adapter changes the output)",
                float(b.abs().max()) > 0)
        ref = logits(model, TOKENS)
        C.close(f"{name}: PeftModel.from_pretrained logits = qtune's",
                qtune_logits(base, TOKENS, adapter), ref, ATOL, RTOL)

        merged_dir = os.path.join(d, name + "-merged")
        oracle.run("qtune-export", "--adapter", adapter, "--model", base, "--merge",
                   "--out", merged_dir)
        mine = safetensors.torch.load_file(os.path.join(merged_dir, "model.safetensors"))
        unloaded = model.merge_and_unload()
        theirs = unloaded.state_dict()
        if unloaded.config.tie_word_embeddings:  # one tensor, saved once (as transformers does)
            theirs.pop("lm_head.weight", None)
        C.check(f"{name}: merged tensor names = merge_and_unload's", sorted(mine) == sorted(theirs),
                f"{len(mine)} vs {len(theirs)}")
        worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
        C.check(f"{name}: qtune-export --merge = PEFT merge_and_unload (every tensor)",
                worst <= 1e-6, f"max |diff| {worst:.3g}")
        C.close(f"{name}: merged model's logits in transformers = PEFT's",
                logits(hf_base(merged_dir), TOKENS), ref, ATOL, RTOL)


def converted_base(d):
    base = os.path.join(d, "base")
    oracle.run("qtune-convert", "--model", oracle.data_path("stories260K.bin"), "--tokenizer",
               oracle.data_path("tok512.bin"), "--out", base, "--dtype", "fp32")
    return base


if __name__ == "__main__":
    oracle.versions("peft", "transformers", "torch")
    d = oracle.tmpdir("peft")
    C.run("qtune adapters", qtune_adapters, d, converted_base(d))
    C.done()
