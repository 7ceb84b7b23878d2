"""Oracle: bitsandbytes 4-bit directories both ways. A directory written by
`qtune-quantize --format bnb` loads with transformers' from_pretrained (its quantization_config
alone; bitsandbytes on the CPU) and gives the logits qtune computes on it; a 4-bit model that
transformers quantizes and saves (save_pretrained) is read by qtune without requantizing and gives
transformers' logits; kept-dense modules stay dense on both sides."""

import json
import os

import safetensors.torch
import torch
import transformers

import oracle

oracle.bnb_generic_cpu_path()

C = oracle.Checks("bnb_dirs")
TOKENS = [[1, 45, 300, 12, 7, 99, 256, 3, 17, 400, 22, 81, 5, 60, 61, 62],
          [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 200, 300, 400, 500, 11, 0]]


def hf_logits(model):
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits.float()


def qtune_logits(model):
    out = os.path.join(oracle.tmpdir("logits"), "logits.safetensors")
    oracle.helper(cmd="logits", model=model, tokens=TOKENS, out=out)
    return safetensors.torch.load_file(out)["logits"]


def ours_in_transformers(d, base):
    out = os.path.join(d, "qtune-bnb")
    oracle.run("qtune-quantize", "--model", base, "--format", "bnb", "--dtype", "fp32",
               "--skip_modules", "layers.1.mlp.down_proj", "--out", out)
    m = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                          dtype=torch.float32)
    down = m.model.layers[1].mlp.down_proj
    C.check("transformers keeps the skipped module dense", type(down).__name__ == "Linear",
            type(down).__name__)
    C.check("transformers loads the others as 4-bit",
            "4bit" in type(m.model.layers[0].self_attn.q_proj).__name__,
            type(m.model.layers[0].self_attn.q_proj).__name__)
    ref = hf_logits(m)
    # Same bytes on both sides: the only differences are summation order and the compute dtype.
    C.close("qtune-quantize --format bnb: transformers' logits = qtune's", qtune_logits(out), ref,
            2e-3, 1e-3)


def theirs_in_qtune(d, base):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32,
                                          llm_int8_skip_modules=["lm_head", "o_proj"])
    m = transformers.LlamaForCausalLM.from_pretrained(base, quantization_config=cfg,
                                                      device_map="cpu", dtype=torch.float32)
    out = os.path.join(d, "transformers-bnb")
    m.save_pretrained(out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    C.check("transformers wrote a bitsandbytes quantization_config",
            qc.get("quant_method") == "bitsandbytes", json.dumps(qc))
    C.close("transformers' saved 4-bit model: qtune's logits = transformers'", qtune_logits(out),
            hf_logits(m), 2e-3, 1e-3)


if __name__ == "__main__":
    oracle.versions("transformers", "bitsandbytes", "torch")
    d = oracle.tmpdir("bnbdirs")
    base = os.path.join(d, "base")
    oracle.run("qtune-convert", "--model", oracle.data_path("stories260K.bin"), "--tokenizer",
               oracle.data_path("tok512.bin"), "--out", base, "--dtype", "fp32")
    C.run("qtune's bnb directory in transformers", ours_in_transformers, d, base)
    C.run("transformers' bnb directory in qtune", theirs_in_qtune, d, base)
    C.done()
