"""Oracle: chat templates. The real template strings of ../shared/data/chat_templates.json rendered
by jinja2 with transformers' settings (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, raise_exception) on a set of conversations, checked against transformers' own
apply_chat_template and the data file's recorded examples.

qtune's side: qtune renders chat templates in C++ (qtune/chat_template.h, the chat-template
issue). Until that is on main there is nothing of qtune's to compare, so this script pins the
reference itself; when it lands, RENDERERS gets one line (the helper's render_chat command) and
every conversation below is compared with qtune's rendering too."""

import json

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
import transformers

import oracle

C = oracle.Checks("chat_templates")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke about 数据 🙂"}],
    [{"role": "system", "content": "  spaces around  "}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": "c"}],
    [{"role": "assistant", "content": "I speak first"}],  # several templates refuse this
]


def jinja_render(source, messages, add_generation_prompt, bos, eos):
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, bos_token=bos, eos_token=eos,
                                          add_generation_prompt=add_generation_prompt)


def transformers_render(source, messages, add_generation_prompt, bos, eos):
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos or None,
                                               eos_token=eos or None, unk_token="<unk>")
    return tok.apply_chat_template(messages, chat_template=source, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


# (name, render(source, messages, add_generation_prompt, bos, eos) -> text). Pending:
#   ("qtune", lambda *a: qtune_render(*a))  -- the helper's render_chat, once qtune renders them
RENDERERS = [("transformers.apply_chat_template", transformers_render)]


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - a refusal is an outcome to compare
        return ("refused", type(e).__name__)


def main():
    oracle.versions("jinja2", "transformers")
    data = json.load(open(oracle.data_path("chat_templates.json"), encoding="utf-8"))
    for model, t in data["templates"].items():
        src, bos, eos = t["chat_template"], t.get("bos_token", ""), t.get("eos_token", "")
        ex = t["example"]
        C.check(f"{model}: jinja2 renders the recorded example",
                jinja_render(src, ex["messages"], ex["add_generation_prompt"], bos, eos) ==
                ex["rendered"])
        for name, render in RENDERERS:
            cases = [(ex["messages"], ex["add_generation_prompt"])] + [
                (c, g) for c in CONVERSATIONS for g in (False, True)]
            bad = [i for i, (msgs, gen) in enumerate(cases)
                   if outcome(render, src, msgs, gen, bos, eos) !=
                   outcome(jinja_render, src, msgs, gen, bos, eos)]
            C.check(f"{model}: {name} = jinja2 with transformers' settings",
                    not bad, f"{len(cases)} conversations, differing: {bad}")
    C.done()


if __name__ == "__main__":
    main()
