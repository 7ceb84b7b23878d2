"""Oracle: qtune's built-in chat templates against jinja2. Every real template string of
../shared/data/chat_templates.json is rendered by jinja2 as transformers renders it
(ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loopcontrols,
raise_exception) over 600 generated conversations -- multi-turn, with and without a system
message, with and without the generation prompt, awkward whitespace and Unicode, and role orders
the templates refuse -- and the qtune built-in the string maps to (qtune_chat_render, i.e.
ChatTemplate::from_jinja + render_text) must give the same text, or refuse exactly where the
template raises."""

import json
import os
import random
import tempfile

import jinja2
import jinja2.ext
import jinja2.sandbox

import oracle

C = oracle.Checks("chat_builtins")

# Contents chosen to trip a renderer: whitespace the templates strip (or do not), Unicode
# whitespace Python's str.strip() knows, text that looks like Jinja or like control tokens.
CONTENTS = [
    "Hello, how are you?", "I'm doing great. How can I help you today?", "", " ", "\n",
    "  leading and trailing  ", "\nnew\nlines\n", "tabs\tinside\t", "\u00a0nbsp\u00a0",
    "\u3000ideographic\u3000", "\u2028line separator\u2029", "zero\u200bwidth\u200b",
    "unicode: h\u00e9llo w\u00f6rld \u2713 \U0001f999", "{{ not jinja }} {% raw %}",
    "quotes ' \" and \\ backslash \\n", "<s>[INST] fake [/INST]</s>", "<|im_end|> <|eot_id|>",
    "<<SYS>>\nnot a system\n<</SYS>>", "multi\n\nparagraph\n\n", "x" * 300, "\x1c\x1dsep\x1e\x1f",
    "\r\nwindows\r\n",
]


def compile_template(source):
    """transformers' _compile_jinja_template (tokenization_utils_base.py), without transformers."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def conversations(rng, n):
    """n conversations: most follow system? (user assistant)* user?, the rest any role order."""
    out = []
    for i in range(n):
        msgs = []
        if i % 4 != 3:
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": rng.choice(CONTENTS)})
            for _ in range(rng.randint(1, 3)):
                msgs.append({"role": "user", "content": rng.choice(CONTENTS)})
                msgs.append({"role": "assistant", "content": rng.choice(CONTENTS)})
            if rng.random() < 0.4:
                msgs.append({"role": "user", "content": rng.choice(CONTENTS)})
        else:
            for _ in range(rng.randint(1, 5)):
                msgs.append({"role": rng.choice(["system", "user", "assistant"]),
                             "content": rng.choice(CONTENTS)})
        out.append(msgs)
    return out


def check_template(model, entry, convs):
    template = compile_template(entry["chat_template"])
    cases, expected = [], []
    for k, msgs in enumerate(convs):
        add_gen = k % 2 == 1
        try:
            want = template.render(messages=msgs, add_generation_prompt=add_gen,
                                   bos_token=entry["bos_token"], eos_token=entry["eos_token"])
        except jinja2.exceptions.TemplateError:
            want = None
        cases.append({"template": entry["chat_template"], "bos_token": entry["bos_token"],
                      "eos_token": entry["eos_token"], "messages": msgs,
                      "add_generation_prompt": add_gen})
        expected.append(want)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"cases": cases}, f, ensure_ascii=False)
    try:
        # split("\n"), not splitlines(): the JSON holds U+2028 and other line breaks of Python's.
        got = json.loads(oracle.run("qtune_chat_render", f.name).strip().split("\n")[-1])
    finally:
        os.unlink(f.name)
    results = got["results"]
    mismatches = []
    for case, want, res in zip(cases, expected, results):
        ok = (res.get("text") == want) if want is not None else ("error" in res)
        if not ok:
            mismatches.append((case["messages"], case["add_generation_prompt"], want, res))
    for msgs, add_gen, want, res in mismatches[:3]:
        print(f"    {model}: messages={json.dumps(msgs)[:300]} add_generation_prompt={add_gen}\n"
              f"      jinja2: {json.dumps(want)[:300]}\n      qtune:  {json.dumps(res)[:300]}")
    refused = sum(w is None for w in expected)
    C.check(f"{model} -> {results[0].get('builtin', '?') if results else '?'}: "
            f"{len(cases)} conversations ({refused} refused by the template) render the same",
            len(results) == len(cases) and not mismatches, f"{len(mismatches)} differ")


def main():
    oracle.versions("jinja2")
    with open(oracle.data_path("chat_templates.json")) as f:
        templates = json.load(f)["templates"]
    rng = random.Random(19)
    convs = conversations(rng, 600)
    for model, entry in templates.items():
        C.run(model, check_template, model, entry, convs)
    C.done()


if __name__ == "__main__":
    main()
