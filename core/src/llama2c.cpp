// llama2.c legacy (v0) checkpoints as a WeightSource with Hugging Face names and rotary layout.
#include "qtune/llama2c.h"

#include <cstring>

#include "mapped_file.h"
#include "qtune/error.h"

namespace qtune {

namespace {
constexpr int64_t kHeaderBytes = 7 * 4;
// export.py's version-1/2 files start with this uint32 ("ak42" read little-endian).
constexpr uint32_t kLlama2cMagic = 0x616b3432;
}  // namespace

int64_t Llama2cHeader::expected_file_size() const {
  const int64_t head_size = dim / n_heads;
  const int64_t kv_dim = dim * n_kv_heads / n_heads;
  int64_t floats = vocab_size * dim                   // token_embedding
                   + n_layers * dim                   // rms_att
                   + n_layers * dim * dim             // wq
                   + 2 * n_layers * kv_dim * dim      // wk, wv
                   + n_layers * dim * dim             // wo
                   + n_layers * dim                   // rms_ffn
                   + 3 * n_layers * hidden_dim * dim  // w1, w2, w3
                   + dim                              // rms_final
                   + seq_len * head_size;             // freq_cis_real + freq_cis_imag
  if (!shared_classifier) floats += vocab_size * dim;
  return kHeaderBytes + 4 * floats;
}

torch::Tensor rope_interleaved_to_half(const torch::Tensor& w, int64_t n_heads) {
  const int64_t out = w.size(0), in = w.size(1);
  QTUNE_CHECK(n_heads > 0 && out % (2 * n_heads) == 0, "rope permutation: ", out,
              " rows cannot be split into ", n_heads, " heads of even size");
  return w.reshape({n_heads, out / n_heads / 2, 2, in}).transpose(1, 2).reshape({out, in});
}

torch::Tensor rope_half_to_interleaved(const torch::Tensor& w, int64_t n_heads) {
  const int64_t out = w.size(0), in = w.size(1);
  QTUNE_CHECK(n_heads > 0 && out % (2 * n_heads) == 0, "rope permutation: ", out,
              " rows cannot be split into ", n_heads, " heads of even size");
  return w.reshape({n_heads, 2, out / n_heads / 2, in}).transpose(1, 2).reshape({out, in});
}

Llama2cCheckpoint::~Llama2cCheckpoint() = default;

std::unique_ptr<Llama2cCheckpoint> Llama2cCheckpoint::open(const std::string& path) {
  auto file = detail::MappedFile::open(path, "llama2.c checkpoint");
  QTUNE_CHECK(file->size() >= static_cast<size_t>(kHeaderBytes), "llama2.c checkpoint ", path,
              " is ", file->size(), " bytes, shorter than its 28-byte header");
  int32_t h[7];
  std::memcpy(h, file->data(), sizeof(h));
  QTUNE_CHECK(static_cast<uint32_t>(h[0]) != kLlama2cMagic, "llama2.c checkpoint ", path,
              " is a version-", h[1],
              " export (magic \"ak42\"); only the legacy v0 format is "
              "supported (export.py --version 0)");

  Llama2cHeader hd;
  hd.dim = h[0];
  hd.hidden_dim = h[1];
  hd.n_layers = h[2];
  hd.n_heads = h[3];
  hd.n_kv_heads = h[4];
  hd.shared_classifier = h[5] > 0;
  hd.vocab_size = h[5] < 0 ? -static_cast<int64_t>(h[5]) : h[5];
  hd.seq_len = h[6];
  const std::string where = "llama2.c checkpoint " + path + ": header ";
  // Bounds keep the size arithmetic below far from overflow and catch files that are not
  // llama2.c checkpoints at all.
  const int64_t kMax = 1 << 20;
  QTUNE_CHECK(hd.dim > 0 && hd.dim <= kMax, where, "dim = ", hd.dim, ", expected 1..", kMax);
  QTUNE_CHECK(hd.hidden_dim > 0 && hd.hidden_dim <= kMax, where, "hidden_dim = ", hd.hidden_dim,
              ", expected 1..", kMax);
  QTUNE_CHECK(hd.n_layers > 0 && hd.n_layers <= 4096, where, "n_layers = ", hd.n_layers,
              ", expected 1..4096");
  QTUNE_CHECK(hd.n_heads > 0 && hd.dim % hd.n_heads == 0 && (hd.dim / hd.n_heads) % 2 == 0, where,
              "n_heads = ", hd.n_heads, ", expected a divisor of dim = ", hd.dim,
              " giving an even head size");
  QTUNE_CHECK(hd.n_kv_heads > 0 && hd.n_heads % hd.n_kv_heads == 0, where,
              "n_kv_heads = ", hd.n_kv_heads, ", expected a divisor of n_heads = ", hd.n_heads);
  QTUNE_CHECK(hd.vocab_size > 0 && hd.vocab_size <= (1 << 24), where, "vocab_size = ", h[5],
              ", expected a non-zero value of magnitude <= ", (1 << 24));
  QTUNE_CHECK(hd.seq_len > 0 && hd.seq_len <= (1 << 24), where, "seq_len = ", hd.seq_len,
              ", expected 1..", (1 << 24));
  const int64_t expected = hd.expected_file_size();
  QTUNE_CHECK(static_cast<int64_t>(file->size()) == expected, "llama2.c checkpoint ", path, " has ",
              file->size(), " bytes but its header (dim ", hd.dim, ", hidden_dim ", hd.hidden_dim,
              ", n_layers ", hd.n_layers, ", n_heads ", hd.n_heads, ", n_kv_heads ", hd.n_kv_heads,
              ", vocab_size ", h[5], ", seq_len ", hd.seq_len, ") requires exactly ", expected,
              " bytes");

  std::unique_ptr<Llama2cCheckpoint> ck(new Llama2cCheckpoint());
  ck->path_ = path;
  ck->data_ = file->data();
  ck->mapping_ = file;
  ck->header_ = hd;

  const int64_t L = hd.n_layers, dim = hd.dim, hidden = hd.hidden_dim;
  const int64_t kv_dim = dim * hd.n_kv_heads / hd.n_heads;
  int64_t offset = kHeaderBytes;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, int64_t rope_heads = 0) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    ck->entries_[name] = Entry{offset, std::move(shape), rope_heads};
    ck->order_.push_back(name);
    offset += 4 * n;
  };
  // Each llama2.c array covers all layers; layer i's slice is consecutive inside it.
  auto add_layers = [&](const std::string& suffix, std::vector<int64_t> shape,
                        int64_t rope_heads = 0) {
    for (int64_t i = 0; i < L; ++i)
      add("model.layers." + std::to_string(i) + "." + suffix, shape, rope_heads);
  };
  add("model.embed_tokens.weight", {hd.vocab_size, dim});
  add_layers("input_layernorm.weight", {dim});
  add_layers("self_attn.q_proj.weight", {dim, dim}, hd.n_heads);
  add_layers("self_attn.k_proj.weight", {kv_dim, dim}, hd.n_kv_heads);
  add_layers("self_attn.v_proj.weight", {kv_dim, dim});
  add_layers("self_attn.o_proj.weight", {dim, dim});
  add_layers("post_attention_layernorm.weight", {dim});
  add_layers("mlp.gate_proj.weight", {hidden, dim});  // w1
  add_layers("mlp.down_proj.weight", {dim, hidden});  // w2
  add_layers("mlp.up_proj.weight", {hidden, dim});    // w3
  add("model.norm.weight", {dim});
  offset += 4 * hd.seq_len * (dim / hd.n_heads);  // freq_cis_real + freq_cis_imag: unused
  if (!hd.shared_classifier) add("lm_head.weight", {hd.vocab_size, dim});
  TORCH_INTERNAL_ASSERT(offset == expected, "llama2.c layout arithmetic disagrees");
  return ck;
}

ModelConfig Llama2cCheckpoint::config() const {
  ModelConfig c;
  c.hidden_size = header_.dim;
  c.intermediate_size = header_.hidden_dim;
  c.num_hidden_layers = header_.n_layers;
  c.num_attention_heads = header_.n_heads;
  c.num_key_value_heads = header_.n_kv_heads;
  c.vocab_size = header_.vocab_size;
  c.max_position_embeddings = header_.seq_len;
  c.rms_norm_eps = 1e-5;   // run.c's rmsnorm
  c.rope_theta = 10000.0;  // run.c's RoPE frequencies
  c.tie_word_embeddings = header_.shared_classifier;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  c.validate(path_);
  return c;
}

const Llama2cCheckpoint::Entry& Llama2cCheckpoint::entry(const std::string& name) const {
  auto it = entries_.find(name);
  QTUNE_CHECK(it != entries_.end(), "tensor \"", name, "\" not found in ", describe());
  return it->second;
}

torch::Tensor Llama2cCheckpoint::raw(const std::string& name) const {
  const Entry& e = entry(name);
  std::shared_ptr<void> keep = mapping_;
  return torch::from_blob(
      const_cast<uint8_t*>(data_ + e.offset), e.shape, [keep](void*) mutable { keep.reset(); },
      torch::TensorOptions().dtype(torch::kFloat32));
}

std::string Llama2cCheckpoint::describe() const { return "llama2.c checkpoint " + path_; }

bool Llama2cCheckpoint::has(const std::string& name) const { return entries_.count(name) != 0; }

std::vector<int64_t> Llama2cCheckpoint::shape(const std::string& name) const {
  return entry(name).shape;
}

torch::Tensor Llama2cCheckpoint::get(const std::string& name, torch::ScalarType dtype) const {
  const Entry& e = entry(name);
  torch::Tensor t = raw(name);
  if (e.rope_heads > 0) t = rope_interleaved_to_half(t, e.rope_heads);  // a copy already
  t = t.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  check_finite_weight(t, path_, name);
  return t;
}

std::vector<std::string> Llama2cCheckpoint::names() const { return order_; }

}  // namespace qtune
