// libqtune_sentencepiece.so: the C ABI of qtune_spm.h over sentencepiece::SentencePieceProcessor.
// Built against sentencepiece only (never LibTorch); see qtune_spm.h for why.
#include "qtune_spm.h"

#include <sentencepiece_processor.h>

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#define QTUNE_SPM_EXPORT extern "C" __attribute__((visibility("default")))

struct QtuneSpm {
  sentencepiece::SentencePieceProcessor sp;
};

namespace {
void set_err(char* err, size_t cap, const std::string& msg) {
  if (!err || cap == 0) return;
  size_t n = msg.size() < cap - 1 ? msg.size() : cap - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}
}  // namespace

QTUNE_SPM_EXPORT int qtune_spm_abi_version(void) { return QTUNE_SPM_ABI_VERSION; }

QTUNE_SPM_EXPORT QtuneSpm* qtune_spm_load(const char* path, char* err, size_t err_cap) {
  try {
    // Owned until returned: sentencepiece's Load can also throw (darts-clone's "failed to
    // insert key" on a malformed piece list), and the processor must be freed then too.
    auto h = std::make_unique<QtuneSpm>();
    auto status = h->sp.Load(path);
    if (!status.ok()) {
      set_err(err, err_cap, status.ToString());
      return nullptr;
    }
    return h.release();
  } catch (const std::exception& e) {
    set_err(err, err_cap, e.what());
  } catch (...) {
    set_err(err, err_cap, "unknown error");
  }
  return nullptr;
}

QTUNE_SPM_EXPORT void qtune_spm_free(QtuneSpm* h) { delete h; }
QTUNE_SPM_EXPORT int qtune_spm_piece_size(const QtuneSpm* h) { return h->sp.GetPieceSize(); }
QTUNE_SPM_EXPORT int qtune_spm_bos_id(const QtuneSpm* h) { return h->sp.bos_id(); }
QTUNE_SPM_EXPORT int qtune_spm_eos_id(const QtuneSpm* h) { return h->sp.eos_id(); }
QTUNE_SPM_EXPORT int qtune_spm_unk_id(const QtuneSpm* h) { return h->sp.unk_id(); }

QTUNE_SPM_EXPORT const char* qtune_spm_id_to_piece(const QtuneSpm* h, int id, size_t* len) {
  const std::string& p = h->sp.IdToPiece(id);
  if (len) *len = p.size();
  return p.c_str();
}

QTUNE_SPM_EXPORT float qtune_spm_score(const QtuneSpm* h, int id) { return h->sp.GetScore(id); }

QTUNE_SPM_EXPORT int qtune_spm_piece_type(const QtuneSpm* h, int id) {
  if (h->sp.IsUnknown(id)) return QTUNE_SPM_UNKNOWN;
  if (h->sp.IsControl(id)) return QTUNE_SPM_CONTROL;
  if (h->sp.IsUnused(id)) return QTUNE_SPM_UNUSED;
  if (h->sp.IsByte(id)) return QTUNE_SPM_BYTE;
  return QTUNE_SPM_NORMAL;  // normal and user-defined decode the same way
}

QTUNE_SPM_EXPORT int qtune_spm_encode(const QtuneSpm* h, const char* text, size_t len,
                                      void (*sink)(void*, const int*, size_t), void* ctx, char* err,
                                      size_t err_cap) {
  try {
    std::vector<int> ids;
    auto status = h->sp.Encode(std::string(text, len), &ids);
    if (!status.ok()) {
      set_err(err, err_cap, status.ToString());
      return -1;
    }
    sink(ctx, ids.data(), ids.size());
    return 0;
  } catch (const std::exception& e) {
    set_err(err, err_cap, e.what());
  } catch (...) {
    set_err(err, err_cap, "unknown error");
  }
  return -1;
}
