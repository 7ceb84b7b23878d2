// Internal to libqtune_core (not installed): JSON / JSONL record files, the per-record error
// report, format detection and the chat record readers (messages, sharegpt) that data.cpp uses.
#pragma once

#include <string>
#include <vector>

#include "qtune/chat_template.h"
#include "qtune/data.h"
#include "qtune/options.h"

namespace qtune::data_detail {

/// Whether `s` holds only whitespace; its first non-whitespace byte ('\0' when none).
bool is_blank(const std::string& s);
char first_non_blank(const std::string& text);

/// One record of a JSON array or JSONL file and its name in messages: "<file> record [i]"
/// (0-based array index) or "<file> line n" (1-based line).
struct JsonRecord {
  Json value;
  std::string where;
  int64_t order = 0;  ///< line (JSONL) or index (array): errors are reported in file order
};

/// Collects every malformed record of a file so that one run reports all of them.
class RecordErrors {
 public:
  /// Adds one message (it already names the record) for the record at `order` (JsonRecord).
  void add(int64_t order, std::string message) {
    messages_.emplace_back(order, std::move(message));
  }
  size_t count() const { return messages_.size(); }
  /// Nothing when empty. Otherwise logs every message in file order (spdlog error, the first
  /// 50) and throws a UserError whose one line is the first one plus how many more there are in
  /// `source`.
  void throw_if_any(const std::string& source);

 private:
  std::vector<std::pair<int64_t, std::string>> messages_;
};

/// The records of a JSON array (text starting with '[') or a JSONL file ('{', one object per
/// line, blank lines allowed). A JSON array that does not parse throws at once (with its line);
/// a JSONL line that does not parse is added to `errors`. `what` names the data ("Alpaca data")
/// and `expected` its records ("{\"instruction\", \"input\", \"output\"} objects") for the
/// message when the text is neither.
std::vector<JsonRecord> read_json_records(const std::string& path, const std::string& text,
                                          const std::string& what, const std::string& expected,
                                          RecordErrors& errors);

/// data.format auto on JSON records: "messages", "sharegpt" or "alpaca" from the first record's
/// keys (see DataConfig::format); throws UserError naming the record and its keys otherwise.
std::string detect_record_format(const JsonRecord& first, const DataConfig& config);

/// The conversation of one messages / sharegpt record with roles mapped to system / user /
/// assistant. Throws UserError naming the record, the message index and the key at fault.
Conversation parse_conversation(const JsonRecord& record, const std::string& format,
                                const DataConfig& config);

}  // namespace qtune::data_detail
