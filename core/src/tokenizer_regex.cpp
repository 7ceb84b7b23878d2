// The pre-tokenizer regex of the BPE tokenizers, on Debian's PCRE2: UTF-8 with Unicode
// properties (\p{L}, \p{N}; \s and case folding Unicode-aware through PCRE2_UCP), invalid UTF-8
// tolerated (it never matches, so it ends up in the gaps), JIT-compiled when PCRE2 has a JIT,
// and every match bounded by PCRE2's match and heap limits.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>

#include "qtune/error.h"
#include "tokenizer_internal.h"

namespace qtune::tok {

// From openai/gpt-2 src/encoder.py (= HF tokenizers' ByteLevel pre-tokenizer).
const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// meta-llama/llama3 llama/tokenizer.py pat_str (see ../shared/data/SOURCES.md).
const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

// Work bounds per match. The pre-tokenizer patterns need a few steps per character; these allow
// pieces of megabytes (a run of spaces, a long word) while a pathological pattern/text pair
// stops with an error instead of backtracking for minutes.
constexpr uint32_t kMatchLimit = 100'000'000;
constexpr uint32_t kHeapLimitKiB = 256 * 1024;
constexpr size_t kJitStackMax = 8 << 20;

struct MatchState {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  MatchState() {
    context = pcre2_match_context_create(nullptr);
    pcre2_set_match_limit(context, kMatchLimit);
    pcre2_set_heap_limit(context, kHeapLimitKiB);
    jit_stack = pcre2_jit_stack_create(32 << 10, kJitStackMax, nullptr);
    if (jit_stack) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchState() {
    if (jit_stack) pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
  }
};

// One match context and JIT stack per thread (encode() is const and may run concurrently).
MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

struct MatchData {
  pcre2_match_data* p;
  explicit MatchData(const pcre2_code* code) : p(pcre2_match_data_create_from_pattern(code, nullptr)) {}
  ~MatchData() { pcre2_match_data_free(p); }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

size_t utf8_char_len(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (n == 1 || i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}

Regex::Regex(const std::string& pattern, bool literal, const std::string& where)
    : pattern_(pattern), where_(where) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
  if (literal) options |= PCRE2_LITERAL;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                        &err, &offset, nullptr);
  QTUNE_CHECK(code_ != nullptr, where, ": pre-tokenizer pattern does not compile at offset ",
              offset, " (", pcre2_message(err), "): ", pattern);
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if absent
}

Regex::~Regex() { pcre2_code_free(code_); }

void Regex::split(std::string_view text, std::vector<Piece>& out) const {
  MatchData md(code_);
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.p);
  size_t pos = 0, start = 0;  // end of the last piece; where to search from
  while (start < text.size()) {
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                               start, 0, md.p, match_state().context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    QTUNE_CHECK(rc >= 0, where_, ": pre-tokenizer regex gave up at byte ", start, " of a ",
                text.size(), "-byte text (", pcre2_message(rc),
                "); the text is pathological for this pattern");
    if (ov[1] == ov[0]) {  // an empty match: look again one character further on
      start = ov[0] + utf8_char_len(text, ov[0]);
      continue;
    }
    if (ov[0] > pos) out.push_back({pos, ov[0], false});
    out.push_back({ov[0], ov[1], true});
    pos = start = ov[1];
  }
  if (pos < text.size()) out.push_back({pos, text.size(), false});
}

}  // namespace qtune::tok
