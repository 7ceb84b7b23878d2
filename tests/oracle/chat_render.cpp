// qtune_chat_render: the C++ side of the chat-template oracle (test_chat_templates.py). Reads a
// JSON file {"cases": [{"template": <Jinja source>, "bos_token", "eos_token", "messages":
// [{"role", "content"}], "add_generation_prompt": bool}, ...]}, picks the built-in each template
// string maps to (ChatTemplate::from_jinja) and prints one JSON line {"results": [...]}, each
// {"builtin": name, "text": rendered} or {"error": message} where qtune refuses the case.
#include <cstdio>
#include <exception>
#include <iostream>

#include "qtune/chat_template.h"
#include "qtune/error.h"
#include "qtune/files.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: qtune_chat_render REQUEST.json\n");
    return 2;
  }
  try {
    const qtune::Json request = qtune::read_json_file(argv[1]);
    qtune::Json results = qtune::Json::array();
    for (const auto& c : request.at("cases")) {
      try {
        const auto t = qtune::ChatTemplate::from_jinja(c.at("template"), "case");
        qtune::Conversation conv;
        for (const auto& m : c.at("messages")) conv.push_back({m.at("role"), m.at("content")});
        const auto token = [&](const char* key) {
          return c.contains(key) && c[key].is_string() ? c[key].get<std::string>() : "";
        };
        results.push_back({{"builtin", t.name()},
                           {"text", t.render_text(conv, c.at("add_generation_prompt"),
                                                  token("bos_token"), token("eos_token"))}});
      } catch (const qtune::UserError& e) {
        results.push_back({{"error", e.what()}});
      }
    }
    std::cout << qtune::Json{{"results", results}}.dump() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qtune_chat_render: %s\n", e.what());
    return 1;
  }
}
