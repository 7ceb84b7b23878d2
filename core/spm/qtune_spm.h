/* Plain-C ABI of libqtune_sentencepiece.so, the wrapper around Debian's libsentencepiece.
 *
 * Why a separate library with a C ABI: Debian's libsentencepiece exports its own bundled
 * protobuf-lite symbols, LibTorch links the full libprotobuf, and linking both into one process
 * the ordinary way crashes at start-up in static initialisers (the same symbol names from two
 * protobuf builds interpose). So core never links sentencepiece: it dlopen()s this module with
 * RTLD_LOCAL | RTLD_DEEPBIND, which makes the module and libsentencepiece resolve their symbols
 * among themselves first.
 * Nothing but C types crosses the boundary, and nothing may throw across it. */
#ifndef QTUNE_SPM_H_
#define QTUNE_SPM_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any change below; core refuses a module with another version. */
#define QTUNE_SPM_ABI_VERSION 1

typedef struct QtuneSpm QtuneSpm;

/* Piece types, numbered as sentencepiece's ModelProto.SentencePiece.Type. */
enum {
  QTUNE_SPM_NORMAL = 1,
  QTUNE_SPM_UNKNOWN = 2,
  QTUNE_SPM_CONTROL = 3,
  QTUNE_SPM_USER_DEFINED = 4,
  QTUNE_SPM_UNUSED = 5,
  QTUNE_SPM_BYTE = 6
};

int qtune_spm_abi_version(void);
/* Loads a .model file; NULL on failure with a message in err (NUL-terminated, truncated). */
QtuneSpm* qtune_spm_load(const char* path, char* err, size_t err_cap);
void qtune_spm_free(QtuneSpm* h);
int qtune_spm_piece_size(const QtuneSpm* h);
/* -1 when the model has no such token. */
int qtune_spm_bos_id(const QtuneSpm* h);
int qtune_spm_eos_id(const QtuneSpm* h);
int qtune_spm_unk_id(const QtuneSpm* h);
/* The piece's bytes (valid while h lives) and its length in *len. */
const char* qtune_spm_id_to_piece(const QtuneSpm* h, int id, size_t* len);
float qtune_spm_score(const QtuneSpm* h, int id);
int qtune_spm_piece_type(const QtuneSpm* h, int id);
/* Encodes text[0, len) (no BOS/EOS) and hands the ids to sink(ctx, ids, n) once. Returns 0, or
 * -1 with a message in err. */
int qtune_spm_encode(const QtuneSpm* h, const char* text, size_t len,
                     void (*sink)(void* ctx, const int* ids, size_t n), void* ctx, char* err,
                     size_t err_cap);

#ifdef __cplusplus
}
#endif

#endif /* QTUNE_SPM_H_ */
