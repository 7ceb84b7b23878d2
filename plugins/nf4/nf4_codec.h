// The NF4 codec shared by the nf4 plugin's weight class and its unit tests: the code tables,
// the bitsandbytes storage layout, and two implementations of quantize / dequantize — fast CPU
// kernels and a pure tensor-op path that runs on any device (the CPU kernels are checked against
// it bit for bit).
//
// Storage (bitsandbytes `quantize_4bit(quant_type="nf4")` and `Params4bit`, so checkpoints
// interchange with the Hugging Face ecosystem):
//   W[out, in] is flattened row-major and cut into blocks of `block_size` elements (the last
//   block may be short). Per block: absmax = max |w| in fp32; every element is scaled by the fp32
//   reciprocal 1/absmax and coded as the number of the 15 NF4 midpoints it strictly exceeds.
//   Codes are packed two per byte, the first element in the high nibble, into a uint8 tensor of
//   shape [(numel + 1) / 2, 1]. Dequantized value = quant_map[code] * absmax (fp32).
//   Double quantization (bitsandbytes `compress_statistics=True`): offset = mean(absmax);
//   absmax - offset is quantized blockwise (blocks of `nested_block_size`) with the signed 8-bit
//   dynamic code: fp32 nested absmax per block, nearest code entry; absmax is rebuilt as
//   nested_quant_map[q] * nested_absmax + offset.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <string>

namespace qtune::nf4 {

// ---- code tables -------------------------------------------------------------------------------

/// The 16 NF4 values, ascending. Source: QLoRA (Dettmers et al. 2023, arXiv:2305.14314,
/// appendix E) and bitsandbytes `functional.get_4bit_type("nf4")` / `dDequantizeNF4` in
/// csrc/kernels.cu; they are the float32 values of those literals.
extern const std::array<float, 16> kNf4Values;
/// The 15 decision thresholds between adjacent NF4 values, ascending, exactly as the float
/// literals of bitsandbytes' `dQuantizeNF4` decision tree (csrc/kernels.cu).
extern const std::array<float, 15> kNf4Midpoints;
/// Code of a value already scaled into [-1, 1]: how many of kNf4Midpoints it strictly exceeds.
uint8_t nf4_code(float scaled);

/// bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, computed
/// afresh with the same float32 tensor arithmetic: 256 sorted float32 values, 0 and 1.0 included.
torch::Tensor make_dynamic_map();
/// Process-wide shared CPU copies of the two tables (float32 [16] and [256]). Never modified;
/// weights hold aliases of them so nbytes() can tell a shared table from a private one.
const torch::Tensor& shared_nf4_map();
const torch::Tensor& shared_dynamic_map();
/// Decision thresholds of an ascending code table: (code[k] + code[k+1]) * 0.5f, n - 1 values.
torch::Tensor code_midpoints(const torch::Tensor& code);

// ---- layout ------------------------------------------------------------------------------------

/// Sizes derived from the logical shape and the options.
struct Layout {
  int64_t out = 0, in = 0;
  int64_t numel = 0;        // out * in
  int64_t block_size = 64;  // elements per absmax block
  int64_t blocks = 0;       // ceil(numel / block_size)
  bool double_quant = true;
  int64_t nested_block_size = 256;  // absmax values per nested block
  int64_t nested_blocks = 0;        // ceil(blocks / nested_block_size), 0 without double quant
  int64_t packed_bytes() const { return (numel + 1) / 2; }

  static Layout make(int64_t out, int64_t in, int64_t block_size, bool double_quant,
                     int64_t nested_block_size);
};

/// The quantized arrays of one weight (all on one device).
struct Packed {
  torch::Tensor data;              // uint8 [(numel + 1) / 2, 1], two codes per byte
  torch::Tensor absmax;            // float32 [blocks], or uint8 [blocks] with double quant
  torch::Tensor quant_map;         // float32 [16]
  torch::Tensor nested_absmax;     // float32 [nested_blocks]   (double quant only)
  torch::Tensor nested_quant_map;  // float32 [256]             (double quant only)
  float offset = 0.0f;             // mean of the fp32 absmax  (double quant only)
};

// ---- quantize ----------------------------------------------------------------------------------

/// CPU kernel: W[out, in] on CPU, any float dtype, any strides. Streams over groups of blocks,
/// so nothing larger than a few blocks is held beyond the outputs. Throws UserError on NaN/Inf.
Packed quantize_cpu(const torch::Tensor& w, const Layout& layout);
/// Tensor-op path (any device). Works on `chunk_elems` elements at a time (rounded to whole
/// blocks); the result is bit-identical to quantize_cpu for any chunk size.
Packed quantize_torch(const torch::Tensor& w, const Layout& layout,
                      int64_t chunk_elems = int64_t{1} << 20);

// ---- dequantize --------------------------------------------------------------------------------

/// fp32 scale of blocks [b0, b1): absmax, or its double-quantized reconstruction. Any device.
torch::Tensor block_scales(const Packed& p, const Layout& layout, int64_t b0, int64_t b1);
/// CPU kernel: rows [r0, r1) of W into `out` (a contiguous CPU tensor [r1 - r0, in] of dtype
/// float32, bfloat16, float16 or float64). Parallel over blocks (at::parallel_for).
void dequantize_rows_cpu(const Packed& p, const Layout& layout, int64_t r0, int64_t r1,
                         torch::Tensor& out);
/// Tensor-op path (any device): rows [r0, r1) of W as a new [r1 - r0, in] tensor of `dtype`.
torch::Tensor dequantize_rows_torch(const Packed& p, const Layout& layout, int64_t r0, int64_t r1,
                                    torch::ScalarType dtype,
                                    int64_t chunk_elems = int64_t{1} << 20);

/// Which CPU kernel dequantize_rows_cpu uses: "avx512", "avx2" or "scalar" (the portable one).
std::string cpu_kernel_name();
/// Tests and measurements pick the kernel: "auto" (the best this CPU has), "avx512", "avx2" or
/// "scalar". Returns false, changing nothing, for a name this CPU cannot run. Process-wide.
bool set_cpu_kernel(const std::string& name);

}  // namespace qtune::nf4
