"""Oracle: PEFT, the other direction and QLoRA. Adapters written by PEFT (random A and B, some or
all projections, rsLoRA) load in qtune with PEFT's logits; a QLoRA adapter trained on qtune's NF4
base gives the logits of PEFT on transformers' bitsandbytes 4-bit base. (test_peft.py: qtune's
LoRA adapters in PEFT, and merging.)"""

import os

import peft
import torch
import transformers

import oracle
from test_peft import TOKENS, converted_base, hf_base, logits, qtune_logits

oracle.bnb_generic_cpu_path()

C = oracle.Checks("peft_foreign")
ATOL, RTOL = 2e-4, 1e-4


def peft_adapters(d, base):
    cases = [
        ("peft_lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("peft_rslora_all", dict(r=2, lora_alpha=5, use_rslora=True,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])),
    ]
    for name, kw in cases:
        torch.manual_seed(5)
        # init_lora_weights=False: random A and B, so the adapter is not the identity.
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw)
        model = peft.get_peft_model(hf_base(base), cfg).eval()
        out = os.path.join(d, name)
        model.save_pretrained(out)
        ref = logits(model, TOKENS)
        C.check(f"{name}: the adapter changes PEFT's logits",
                float((ref - logits(hf_base(base), TOKENS)).abs().max()) > 1e-3)
        C.close(f"{name}: adapter written by PEFT, qtune's logits = PEFT's",
                qtune_logits(base, TOKENS, out), ref, ATOL, RTOL)


def qlora_adapter(d, base):
    """QLoRA: an adapter trained on qtune's NF4 base, on transformers' bitsandbytes 4-bit base
    (BitsAndBytesConfig nf4 + double quantization, on the CPU). The bases agree to the last
    NF4 code; the double-quantized absmax can differ in a few codes (docs/oracles.md), so the
    logits agree to a small fraction of what 4-bit quantization itself changes."""
    out = os.path.join(d, "qlora")
    oracle.run("trainer", "--model", base, "--train_type", "qlora", "--quant", "nf4", "--data",
               oracle.data_path("tinyshakespeare.txt"), "--max_steps", "3", "--batch_size", "2",
               "--seq_len", "32", "--eval_every", "0", "--lr", "0.02", "--threads", "1",
               "--output_dir", out, "train.warmup_steps=0", "eval.max_batches=1",
               "adapter.options.rank=4", "quant.skip_output=true")
    adapter = os.path.join(out, "adapter")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    m4 = transformers.LlamaForCausalLM.from_pretrained(base, quantization_config=cfg,
                                                       device_map="cpu", dtype=torch.float32)
    ref = logits(peft.PeftModel.from_pretrained(m4, adapter).eval(), TOKENS)
    dense = logits(peft.PeftModel.from_pretrained(hf_base(base), adapter).eval(), TOKENS)
    effect = float((dense - ref).abs().max())
    C.check("qlora: 4-bit quantization changes transformers' logits", effect > 0.1,
            f"max |dense - 4-bit| {effect:.3g}")
    C.close("qlora: PeftModel on bitsandbytes' 4-bit base = qtune's qlora logits",
            qtune_logits(base, TOKENS, adapter), ref, 1e-2 * effect)


if __name__ == "__main__":
    oracle.versions("peft", "transformers", "bitsandbytes", "torch")
    d = oracle.tmpdir("peft")
    base = converted_base(d)
    C.run("PEFT adapters", peft_adapters, d, base)
    C.run("QLoRA adapter", qlora_adapter, d, base)
    C.done()
