"""Oracle: model families. qtune's logits equal transformers' own class for each family on small
random models that transformers itself builds and saves (fp32, eager attention): Llama with
Llama 3.1 rope scaling, an explicit head_dim and tied embeddings, Llama with linear and dynamic
NTK scaling, Mistral with a sliding window shorter than the sequence, Qwen2 with (non-zero) q/k/v
biases, and Qwen2 with its sliding window on the upper layers. Each case also shows its
family-specific part matters: transformers' logits without it differ from qtune's by far more
than the tolerance."""

import copy
import os

import safetensors.torch
import torch
import transformers

import oracle

C = oracle.Checks("families")
ATOL, RTOL = 2e-4, 1e-4


def hf_logits(path, tokens):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits


def qtune_logits(model, tokens):
    out = os.path.join(oracle.tmpdir("logits"), "logits.safetensors")
    oracle.helper(cmd="logits", model=model, tokens=tokens, out=out)
    return safetensors.torch.load_file(out)["logits"]


def tokens(vocab, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, length), generator=g).tolist()


def save(d, name, cls, config, randomize_bias=False):
    torch.manual_seed(5)
    m = cls(config)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias") and randomize_bias:  # transformers initialises them to 0
                p.normal_(0.0, 0.5)
    path = os.path.join(d, name)
    m.save_pretrained(path)
    return path


def case(d, name, cls, config, length, without, randomize_bias=False):
    """Parity on `config`; `without` edits a copy of the config to drop the family's part."""
    path = save(d, name, cls, config, randomize_bias)
    t = tokens(config.vocab_size, length, seed=len(name))
    ours = qtune_logits(path, t)
    C.close(f"{name}: qtune logits = transformers' {cls.__name__}", ours, hf_logits(path, t),
            ATOL, RTOL)
    if without is None:
        return
    plain = copy.deepcopy(config)
    without(plain)
    other = os.path.join(d, name + "_without")
    m = cls.from_pretrained(path, config=plain, dtype=torch.float32)
    if randomize_bias:  # the family part is the bias: zero it in the copy
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.zero_()
    m.save_pretrained(other)
    diff = float((hf_logits(other, t) - ours).abs().max())
    C.check(f"{name}: without it transformers' logits differ from qtune's", diff > 100 * ATOL,
            f"max |diff| {diff:.3g}")


def rope(theta, scaling):
    """Config kwargs for rope_theta and a scaling dict in the installed transformers' spelling
    (transformers 5 keeps both in rope_parameters)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def families():
    d = oracle.tmpdir("families")
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                initializer_range=0.2)
    L, M, Q = transformers.LlamaConfig, transformers.MistralConfig, transformers.Qwen2Config

    def no_rope_scaling(c):
        if int(transformers.__version__.split(".")[0]) >= 5:
            theta = (c.rope_parameters or {}).get("rope_theta", 10000.0)
            c.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        else:
            c.rope_scaling = None

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    case(d, "llama3_headdim32_tied", transformers.LlamaForCausalLM,
         L(**base, head_dim=32, vocab_size=1000, max_position_embeddings=256,
           tie_word_embeddings=True, **rope(500000.0, llama3)),
         96, no_rope_scaling)
    case(d, "llama_linear_untied", transformers.LlamaForCausalLM,
         L(**base, vocab_size=300, max_position_embeddings=128,
           **rope(10000.0, {"rope_type": "linear", "factor": 4.0})), 64, no_rope_scaling)
    case(d, "llama_dynamic", transformers.LlamaForCausalLM,
         L(**base, vocab_size=300, max_position_embeddings=32,
           **rope(10000.0, {"rope_type": "dynamic", "factor": 2.0})), 80, no_rope_scaling)

    def no_window(c):
        c.sliding_window = None
        if hasattr(c, "layer_types") and c.layer_types is not None:
            c.layer_types = ["full_attention"] * c.num_hidden_layers
        c.use_sliding_window = False

    case(d, "mistral_window8", transformers.MistralForCausalLM,
         M(**base, vocab_size=300, max_position_embeddings=128, sliding_window=8), 40, no_window)
    case(d, "qwen2_bias", transformers.Qwen2ForCausalLM,
         Q(**base, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True,
           **rope(1000000.0, None)), 40, lambda c: None, randomize_bias=True)
    case(d, "qwen2_window_upper_layer", transformers.Qwen2ForCausalLM,
         Q(**base, vocab_size=300, max_position_embeddings=128, use_sliding_window=True,
           sliding_window=8, max_window_layers=1), 40, no_window, randomize_bias=False)


if __name__ == "__main__":
    oracle.versions("transformers", "torch")
    C.run("families", families)
    C.done()
