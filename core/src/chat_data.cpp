// Record files for the data pipeline: JSON arrays and JSONL, every malformed record reported,
// data.format auto, and the chat readers: OpenAI / Hugging Face "messages" and ShareGPT
// "conversations", with configurable keys and role names.
#include "chat_data.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>

#include "qtune/error.h"

namespace qtune::data_detail {

// ---------------------------------------------------------------------------------------------
// Records and their errors

bool is_blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

char first_non_blank(const std::string& text) {
  for (unsigned char c : text)
    if (!std::isspace(c)) return static_cast<char>(c);
  return '\0';
}

void RecordErrors::throw_if_any(const std::string& source) {
  if (messages_.empty()) return;
  // Lines that do not parse are found before the records that do are checked.
  std::stable_sort(messages_.begin(), messages_.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  const size_t n = messages_.size();
  if (n == 1) throw UserError(messages_[0].second);
  constexpr size_t kLogged = 50;
  for (size_t i = 0; i < std::min(n, kLogged); ++i) spdlog::error("{}", messages_[i].second);
  if (n > kLogged) spdlog::error("... and {} more malformed records in {}", n - kLogged, source);
  throw UserError(detail::concat(messages_[0].second, " (and ", n - 1, " more malformed record",
                                 n > 2 ? "s" : "", " in ", source, ", logged above)"));
}

namespace {

int64_t line_of_byte(const std::string& text, size_t byte) {
  byte = std::min(byte, text.size());
  return 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(byte), '\n');
}

// A value for an error message: its JSON, cut to a readable length.
std::string short_dump(const Json& v) {
  std::string s = v.dump();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

std::string keys_of(const Json& j) {
  std::string keys;
  for (const auto& [k, _] : j.items()) keys += (keys.empty() ? "" : ", ") + k;
  return keys.empty() ? "none" : keys;
}

}  // namespace

std::vector<JsonRecord> read_json_records(const std::string& path, const std::string& text,
                                          const std::string& what, const std::string& expected,
                                          RecordErrors& errors) {
  std::vector<JsonRecord> records;
  const char c = first_non_blank(text);
  if (c == '[') {
    Json all;
    try {
      all = Json::parse(text);
    } catch (const Json::parse_error& e) {
      throw UserError(detail::concat(path, " line ", line_of_byte(text, e.byte), ": invalid JSON (",
                                     e.what(), ")"));
    }
    records.reserve(all.size());
    for (size_t i = 0; i < all.size(); ++i)
      records.push_back({std::move(all[i]), detail::concat(path, " record [", i, "]"),
                         static_cast<int64_t>(i)});
  } else if (c == '{') {
    size_t start = 0;
    int64_t line_no = 0;
    while (start < text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      ++line_no;
      const std::string line = text.substr(start, end - start);
      start = end + 1;
      if (is_blank(line)) continue;
      std::string where = detail::concat(path, " line ", line_no);
      try {
        records.push_back({Json::parse(line), std::move(where), line_no});
      } catch (const Json::parse_error& e) {
        errors.add(line_no, detail::concat(where, ": invalid JSON (", e.what(),
                                  "); expected one object per line (JSONL) or a JSON array"));
      }
    }
  } else {
    throw UserError(detail::concat(path, ": not ", what, ": expected a JSON array of ", expected,
                                   " or one such object per line (JSONL); set data.format: text "
                                   "for plain text"));
  }
  QTUNE_CHECK(!records.empty() || errors.count() > 0, path, ": no records");
  return records;
}

// ---------------------------------------------------------------------------------------------
// Format detection

std::string detect_record_format(const JsonRecord& first, const DataConfig& config) {
  const Json& j = first.value;
  QTUNE_CHECK(j.is_object(), first.where, ": data.format auto: expected an object, got ",
              j.type_name(), " ", short_dump(j));
  std::vector<std::string> chat_keys;
  if (!config.messages_field.empty()) chat_keys.push_back(config.messages_field);
  chat_keys.push_back("messages");
  chat_keys.push_back("conversations");
  for (const auto& key : chat_keys) {
    if (!j.contains(key)) continue;
    // The messages themselves tell the two apart better than the list's key does.
    const Json& list = j[key];
    if (list.is_array() && !list.empty() && list[0].is_object()) {
      if (list[0].contains("from") || list[0].contains("value")) return "sharegpt";
      if (list[0].contains("role") || list[0].contains("content")) return "messages";
    }
    return key == "conversations" ? "sharegpt" : "messages";
  }
  if (j.contains("instruction") && j.contains("output")) return "alpaca";
  throw UserError(detail::concat(
      first.where, ": data.format auto cannot tell the format from the keys (", keys_of(j),
      "): expected \"messages\" (messages), \"conversations\" (sharegpt) or \"instruction\" and "
      "\"output\" (alpaca); set data.format, or data.messages_field for another message-list key"));
}

// ---------------------------------------------------------------------------------------------
// Conversations

namespace {

struct ChatFields {
  std::string messages, role, content;
  // data set role name -> system / user / assistant
  std::vector<std::pair<std::string, std::string>> roles;
};

ChatFields chat_fields(const std::string& format, const DataConfig& c) {
  const bool share = format == "sharegpt";
  ChatFields f;
  f.messages = !c.messages_field.empty() ? c.messages_field : share ? "conversations" : "messages";
  f.role = !c.role_field.empty() ? c.role_field : share ? "from" : "role";
  f.content = !c.content_field.empty() ? c.content_field : share ? "value" : "content";
  auto add = [&](const std::vector<std::string>& names, std::vector<std::string> defaults,
                 const char* role) {
    for (const auto& n : names.empty() ? defaults : names) f.roles.emplace_back(n, role);
  };
  add(c.role_system, {"system"}, "system");
  add(c.role_user, share ? std::vector<std::string>{"human", "user"} : std::vector<std::string>{"user"},
      "user");
  add(c.role_assistant,
      share ? std::vector<std::string>{"gpt", "assistant"} : std::vector<std::string>{"assistant"},
      "assistant");
  return f;
}

// OpenAI's content may be a list of parts; the text parts are joined (nothing in between).
std::string content_text(const Json& v, const std::string& at, const std::string& key) {
  if (v.is_string()) return v.get<std::string>();
  QTUNE_CHECK(v.is_array(), at, ": key \"", key, "\" must be a string (or a list of ",
              "{\"type\": \"text\", \"text\": ...} parts), got ", v.type_name(), " ", short_dump(v));
  std::string text;
  for (size_t k = 0; k < v.size(); ++k) {
    const Json& part = v[k];
    QTUNE_CHECK(part.is_object() && part.value("type", "") == "text" && part.contains("text") &&
                    part["text"].is_string(),
                at, ": ", key, "[", k, "] must be {\"type\": \"text\", \"text\": \"...\"}, got ",
                short_dump(part));
    text += part["text"].get<std::string>();
  }
  return text;
}

}  // namespace

Conversation parse_conversation(const JsonRecord& record, const std::string& format,
                                const DataConfig& config) {
  const ChatFields f = chat_fields(format, config);
  const Json& j = record.value;
  const std::string& where = record.where;
  QTUNE_CHECK(j.is_object(), where, ": expected an object with \"", f.messages,
              "\" (a list of messages), got ", j.type_name(), " ", short_dump(j));
  // Without data.messages_field either usual key holds the list (ShareGPT-style messages under
  // "messages" are common).
  std::string key = f.messages;
  const char* other = key == "messages" ? "conversations" : "messages";
  if (config.messages_field.empty() && !j.contains(key) && j.contains(other)) key = other;
  QTUNE_CHECK(j.contains(key), where, ": key \"", key, "\" is missing (keys: ", keys_of(j),
              "; data.messages_field names the key of the message list)");
  const Json& list = j[key];
  QTUNE_CHECK(list.is_array() && !list.empty(), where, ": \"", key,
              "\" must be a non-empty list of messages, got ", short_dump(list));
  Conversation conv;
  bool has_assistant = false;
  for (size_t i = 0; i < list.size(); ++i) {
    const Json& m = list[i];
    const std::string at = detail::concat(where, ": ", key, "[", i, "]");
    QTUNE_CHECK(m.is_object(), at, ": expected an object with \"", f.role, "\" and \"", f.content,
                "\", got ", m.type_name(), " ", short_dump(m));
    QTUNE_CHECK(m.contains(f.role) && m[f.role].is_string(), at, ": key \"", f.role,
                "\" must be a string (keys: ", keys_of(m), "; data.role_field names it)");
    QTUNE_CHECK(m.contains(f.content), at, ": key \"", f.content, "\" is missing (keys: ",
                keys_of(m), "; data.content_field names it)");
    const std::string name = m[f.role].get<std::string>();
    auto it = std::find_if(f.roles.begin(), f.roles.end(),
                           [&](const auto& r) { return r.first == name; });
    if (it == f.roles.end()) {
      std::string known;
      for (const auto& r : f.roles) known += (known.empty() ? "" : ", ") + r.first;
      throw UserError(detail::concat(at, ": unknown role \"", name, "\" (expected one of: ", known,
                                     "; data.role_user, data.role_assistant and data.role_system "
                                     "name a data set's roles)"));
    }
    conv.push_back({it->second, content_text(m[f.content], at, f.content)});
    has_assistant |= it->second == "assistant";
  }
  QTUNE_CHECK(has_assistant || config.train_on_prompt, where,
              ": no assistant message, so nothing to learn (data.train_on_prompt: true trains on "
              "every token)");
  return conv;
}

}  // namespace qtune::data_detail
