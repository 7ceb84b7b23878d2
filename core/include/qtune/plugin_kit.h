// The plugin author's kit: what every quantization backend would otherwise write again. Checks of
// the matrix handed to quantize(), chunked quantization with bounded temporary memory, per-group
// scale bookkeeping, and a harness that compares a backend with the author's scalar reference in
// their own tests. State validation for load() is in qtune/state_layout.h. Plain functions: using
// them (or not) changes nothing in the plugin ABI.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>

#include "qtune/error.h"
#include "qtune/export.h"
#include "qtune/quantized_weight.h"

namespace qtune {

/// The checks quantize() owes its input: `w` defined, 2-D [out, in], floating point and (unless
/// `allow_empty`) not empty. Throws UserError "<backend>: the weight must be ..., got ...".
/// NaN/Inf are checked per chunk by for_each_row_chunk (a full pass here would double the reads).
QTUNE_API void check_input_matrix(const torch::Tensor& w, const std::string& backend,
                                  bool allow_empty = false);

/// Rows of fp32 temporaries per chunk by default: about 1M elements (4 MB) per temporary,
/// whatever the matrix size, so quantizing a layer costs the result plus a few MB.
constexpr int64_t kDefaultChunkElems = int64_t{1} << 20;

/// Calls `fn(begin, end, rows)` for consecutive row ranges [begin, end) covering w [out, in],
/// each of about `chunk_elems` elements (at least one row; a multiple of `row_multiple` rows
/// except the last), with `rows` = w[begin:end] as contiguous fp32 on w's device. Throws
/// UserError "<backend>: the weight contains NaN or Inf (rows a..b)" before calling `fn` on such
/// a chunk. Runs under NoGradGuard. Chunks run one after another (deterministic).
QTUNE_API void for_each_row_chunk(
    const torch::Tensor& w, const std::string& backend,
    const std::function<void(int64_t begin, int64_t end, const torch::Tensor& rows)>& fn,
    int64_t chunk_elems = kDefaultChunkElems, int64_t row_multiple = 1);

/// Groups per row for `in` columns in groups of `group_size` (0 = one group per row); the last
/// group of a row may be shorter.
QTUNE_API int64_t groups_per_row(int64_t in, int64_t group_size);

/// Per-group absmax of rows x [rows, in] (fp32) -> [rows, groups_per_row(in, group_size)].
QTUNE_API torch::Tensor group_absmax(const torch::Tensor& x, int64_t group_size);

/// Per-group values s [rows, G] expanded to [rows, in] (each repeated over its group's columns).
QTUNE_API torch::Tensor expand_groups(const torch::Tensor& s, int64_t group_size, int64_t in);

/// For the author's own tests: compares weight `w` with `expected` [out, in] fp32, the
/// dequantization the author's scalar reference computes (from the original matrix or from the
/// state). Checks dequantize() in fp32 (each element within `tol`, 0 = bit-exact) and in bf16
/// (expected rounded once), dequantize_rows() on a few ranges (bit-identical to the slices), and
/// linear()/linear_grad_input() against matmuls with `expected` (normalised error 1e-5).
/// Returns "" when all agree, otherwise one line naming the first disagreement
/// ("dequantize(fp32)[3, 17] = 0.25, the reference says 0.125").
QTUNE_API std::string compare_to_reference(const QuantizedWeight& w, const torch::Tensor& expected,
                                           double tol = 0.0);

}  // namespace qtune
