// The tuning spec: what goes in every projection slot of a model, and the one place that builds
// it — from a recipe (training), from a recorded run identity (export, generation, resume), or
// for a base model alone (perplexity, generation without an adapter).
//
// The base and the adapter are independent, as torchtune's `quantize_base` is independent of
// LoRA: a base is dense trainable, dense frozen, or quantized by a backend; an adapter is absent
// or a factory with options and targets. The three train types are three combinations:
//   full  = trainable base, no adapter
//   lora  = frozen dense base + adapter
//   qlora = quantized base + adapter
// and a frozen or quantized base with no adapter is a model for inference.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "qtune/adapter.h"
#include "qtune/export.h"
#include "qtune/options.h"
#include "qtune/quantized_weight.h"

namespace qtune {

class Registry;
class BaseShards;

enum class TrainType { kFull, kLora, kQlora };
/// "full" | "lora" | "qlora"; throws UserError naming `train_type` otherwise.
QTUNE_API TrainType parse_train_type(const std::string& s);
QTUNE_API std::string to_string(TrainType t);
/// "fp32" | "bf16" (also "float32", "bfloat16"); throws UserError naming `key` otherwise.
QTUNE_API torch::ScalarType parse_dtype(const std::string& s, const std::string& key = "dtype");

/// The projection kinds an adapter can target, by short name.
/// q,k,v,o -> self_attn.{q,k,v,o}_proj; gate,up,down -> mlp.*_proj; output -> lm_head.
QTUNE_API const std::vector<std::string>& all_target_modules();
/// Expands "all-linear" and validates names (HF spellings q_proj, lm_head accepted); throws
/// UserError naming `key` for an unknown one or an empty list.
QTUNE_API std::set<std::string> parse_target_modules(const std::vector<std::string>& names,
                                                     const std::string& key);

/// Whether module path `path` ("model.layers.0.mlp.down_proj", "lm_head") matches one of
/// `patterns`: a pattern with * or ? is a glob over the whole path; any other pattern matches
/// when it equals a run of whole dot-separated components ("lm_head", "down_proj", "mlp",
/// "layers.0", the full path), as bitsandbytes' skip lists are written.
QTUNE_API bool module_matches(const std::string& path, const std::vector<std::string>& patterns);

/// The base weights of the projections.
struct QTUNE_API BaseSpec {
  enum class Kind {
    kTrainable,  ///< dense fp32 master parameters (full fine-tuning)
    kFrozen,     ///< dense buffers in the compute dtype
    kQuantized,  ///< frozen, quantized by `quant` (every projection, see quant_skip_output)
  };
  Kind kind = Kind::kTrainable;
  std::shared_ptr<QuantBackend> quant;  ///< kQuantized only
  Json quant_options = Json::object();  ///< resolved against the backend's schema
  bool quant_skip_output = false;       ///< kQuantized: keep the output head dense
  /// kQuantized: module patterns kept dense (bitsandbytes' llm_int8_skip_modules; see
  /// module_matches). A pre-quantized model also keeps dense what it stores dense.
  std::vector<std::string> quant_skip_modules;
  /// kQuantized: when set, each decoder layer's quantized projections keep only this rank's
  /// shard (dist.shard_base, sharded_base.h); null keeps the whole base on every rank.
  std::shared_ptr<BaseShards> shards;
};

/// The trainable adapter beside the (frozen) base projections; absent when `factory` is null.
struct QTUNE_API AdapterSpec {
  std::shared_ptr<AdapterFactory> factory;
  Json options = Json::object();        ///< resolved against the factory's schema
  std::set<std::string> target_modules;  ///< short names, see all_target_modules()

  bool present() const { return factory != nullptr; }
  /// Whether the slot `short_name` gets an adapter.
  bool targets(const std::string& short_name) const {
    return factory && target_modules.count(short_name) > 0;
  }
};

/// What to put in each projection slot, and in which dtype to compute. The next field to come
/// here is the device.
struct QTUNE_API TuningSpec {
  BaseSpec base;
  AdapterSpec adapter;
  /// Compute dtype: activations and frozen dense weights. Trainable weights are fp32 masters
  /// (fp64 when the compute dtype is fp64, which only tests use).
  torch::ScalarType dtype = torch::kFloat32;

  bool trainable_base() const { return base.kind == BaseSpec::Kind::kTrainable; }
  bool quantized_base() const { return base.kind == BaseSpec::Kind::kQuantized; }
  /// The train type this spec is ("full", "lora", "qlora"), or "frozen" / "quantized" for a
  /// base with no adapter (inference).
  std::string name() const;
  /// Throws UserError for a combination no model can be built from (a quantized base without a
  /// backend, a trainable base with an adapter, an adapter with no targets).
  void validate() const;

  /// The spec of a training run. `quant_name`/`quant_options` are used for qlora only,
  /// `adapter_name`/`adapter_options`/`targets` for lora and qlora; plugins come from
  /// `registry`, options are resolved against their schemas (errors name `key_prefix`.quant.*
  /// etc. as the recipe spells them).
  static TuningSpec for_training(TrainType type, torch::ScalarType dtype,
                                 const Registry& registry, const std::string& quant_name,
                                 const Json& quant_options, bool quant_skip_output,
                                 const std::string& adapter_name, const Json& adapter_options,
                                 const std::vector<std::string>& targets,
                                 const std::vector<std::string>& quant_skip_modules = {});
  /// The spec a run identity (run_identity.h) records, with plugins from `registry`; what the
  /// identity names must be registered (UserError naming it otherwise).
  static TuningSpec from_identity(const Json& identity, const Registry& registry);
  /// A base alone: frozen dense, or quantized by `quant` (not null) with `quant_options`.
  static TuningSpec for_base(torch::ScalarType dtype, std::shared_ptr<QuantBackend> quant = nullptr,
                             const Json& quant_options = Json::object(),
                             bool quant_skip_output = false);
};

}  // namespace qtune
