// Checkpoints (core/checkpoint.h): exact round trips of weights, AdamW moments and RNG state;
// the step-N / latest / keep layout; interrupted saves leave the previous checkpoint intact;
// identity checks refuse another base, backend or adapter with both values in the message; PEFT
// loading refuses the wrong base.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "qtune/checkpoint.h"
#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/peft.h"
#include "qtune/registry.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

TuningSpec spec_of(TrainType type, int64_t rank = 4) {
  return TuningSpec::for_training(type, torch::kFloat32, plugins(), "nf4",
                                  Json{{"block_size", 32}}, false, "lora", Json{{"rank", rank}},
                                  {"all-linear"});
}

torch::optim::AdamW make_optimizer(LlamaForCausalLMImpl& m) {
  std::vector<torch::Tensor> params;
  for (auto& [_, p] : m.trainable_parameters()) params.push_back(p);
  return torch::optim::AdamW(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
}

void train_step(LlamaForCausalLMImpl& m, torch::optim::AdamW& opt, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto tokens = torch::randint(0, 32, {2, 8}, gen, torch::kLong);
  auto targets = torch::randint(0, 32, {2, 8}, gen, torch::kLong);
  opt.zero_grad();
  m.loss(tokens, targets).first.backward();
  opt.step();
}

CheckpointState state_at(int64_t step, const Json& identity = Json::object()) {
  CheckpointState s;
  s.step = step;
  s.loader = Json{{"epoch", 0}, {"index", step}, {"seed", 0}, {"num_examples", 64}, {"batch_size", 2}};
  s.rng = capture_rng_state();
  s.recipe = Json{{"note", "test"}};
  s.identity = identity;
  return s;
}

void expect_same_parameters(const LlamaForCausalLMImpl& a, const LlamaForCausalLMImpl& b) {
  auto pa = a.trainable_parameters(), pb = b.trainable_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_TRUE(torch::equal(pa[i].second, pb[i].second)) << pa[i].first;
  }
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

}  // namespace

TEST(Checkpoint, RngStateRoundTrips) {
  torch::manual_seed(5);
  const Json saved = capture_rng_state();
  auto a = torch::randn({16});
  torch::rand({100});  // move on
  restore_rng_state(saved);
  EXPECT_TRUE(torch::equal(a, torch::randn({16})));
  EXPECT_NE(message_of([] {
              restore_rng_state(Json{{"cpu", "zz"}});
            }).find("hex"),
            std::string::npos);
}

// Weights, moments and step counts come back exactly, so the next optimizer step after a load
// is the same as without the round trip (checked for an adapter run and a full run, whose
// weights go to different files).
TEST(Checkpoint, SaveLoadIsExactForLoraAndFull) {
  for (TrainType type : {TrainType::kLora, TrainType::kFull}) {
    const auto root = test::temp_dir("ckpt") + "/checkpoints";
    auto c = tiny_config();
    auto w = random_weights(c, 3);
    torch::manual_seed(1);
    LlamaForCausalLM a(c, *w, spec_of(type));
    auto opt_a = make_optimizer(*a);
    train_step(*a, opt_a, 10);
    train_step(*a, opt_a, 11);
    const auto dir = save_checkpoint(root, *a, opt_a, state_at(2), 2, "tiny");
    EXPECT_EQ(dir, root + "/step-2");
    const bool adapters = type != TrainType::kFull;
    EXPECT_EQ(fs::exists(dir + "/adapter_model.safetensors"), adapters);
    EXPECT_EQ(fs::exists(dir + "/adapter_config.json"), adapters);
    EXPECT_EQ(fs::exists(dir + "/trainable.safetensors"), !adapters);
    EXPECT_TRUE(fs::exists(dir + "/optimizer.safetensors"));

    torch::manual_seed(99);  // different adapter initialisation
    LlamaForCausalLM b(c, *w, spec_of(type));
    auto opt_b = make_optimizer(*b);
    const auto st = read_checkpoint_state(dir);
    EXPECT_EQ(st.step, 2);
    load_checkpoint_tensors(dir, st, *b, opt_b);
    expect_same_parameters(*a, *b);
    // One more step on both: equal only if the moments and step counts were restored.
    train_step(*a, opt_a, 12);
    train_step(*b, opt_b, 12);
    expect_same_parameters(*a, *b);
  }
}

TEST(Checkpoint, LatestPointerKeepAndAbandonedTimeline) {
  const auto root = test::temp_dir("ckpt") + "/checkpoints";
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  LlamaForCausalLM m(c, *w, spec_of(TrainType::kLora));
  auto opt = make_optimizer(*m);
  train_step(*m, opt, 1);
  for (int64_t s = 1; s <= 4; ++s) save_checkpoint(root, *m, opt, state_at(s), 2, "tiny");
  EXPECT_FALSE(fs::exists(root + "/step-1"));
  EXPECT_FALSE(fs::exists(root + "/step-2"));
  EXPECT_TRUE(fs::exists(root + "/step-3"));
  EXPECT_TRUE(fs::exists(root + "/step-4"));
  EXPECT_EQ(test::read_file(root + "/latest"), "step-4\n");
  EXPECT_EQ(resolve_checkpoint("latest", root), root + "/step-4");
  // A run resumed from step 3 saves step 4 again: replaced in place, pointer updated.
  save_checkpoint(root, *m, opt, state_at(4), 2, "tiny");
  EXPECT_TRUE(fs::exists(root + "/step-4/trainer_state.json"));
  // A run resumed from an older checkpoint keeps the later ones of the abandoned timeline.
  save_checkpoint(root, *m, opt, state_at(2), 1, "tiny");
  EXPECT_TRUE(fs::exists(root + "/step-3"));
  EXPECT_TRUE(fs::exists(root + "/step-4"));
  EXPECT_EQ(resolve_checkpoint("latest", root), root + "/step-2");
  // An output directory resolves to its latest too.
  EXPECT_EQ(resolve_checkpoint(fs::path(root).parent_path().string(), ""), root + "/step-2");
}

// A save that fails half-way (the write throws, as on a full disk) leaves the previous
// checkpoint and the pointer as they were, and no temporary directory behind.
TEST(Checkpoint, InterruptedSaveLeavesPreviousCheckpointLoadable) {
  const auto root = test::temp_dir("ckpt") + "/checkpoints";
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  LlamaForCausalLM m(c, *w, spec_of(TrainType::kLora));
  auto opt = make_optimizer(*m);
  train_step(*m, opt, 1);
  save_checkpoint(root, *m, opt, state_at(4), 2, "tiny");
  train_step(*m, opt, 2);
  setenv("QTUNE_DEBUG_FAIL", "save@5", 1);
  const std::string msg =
      message_of([&] { save_checkpoint(root, *m, opt, state_at(5), 2, "tiny"); });
  unsetenv("QTUNE_DEBUG_FAIL");
  EXPECT_NE(msg.find("injected failure at save@5"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(root + "/step-5"));
  for (const auto& e : fs::directory_iterator(root))
    EXPECT_NE(e.path().filename().string().rfind(".step-", 0), 0u) << e.path();
  EXPECT_EQ(resolve_checkpoint("latest", root), root + "/step-4");
  LlamaForCausalLM m2(c, *w, spec_of(TrainType::kLora));
  auto opt2 = make_optimizer(*m2);
  load_checkpoint_tensors(root + "/step-4", read_checkpoint_state(root + "/step-4"), *m2, opt2);

  // What a kill during a save leaves (a temporary directory) is ignored by resume and removed
  // by the next save; a dangling pointer falls back to the newest complete checkpoint.
  fs::create_directories(root + "/.step-9.tmp-abcdef");
  std::ofstream(root + "/.step-9.tmp-abcdef/optimizer.safetensors") << "partial";
  fs::create_directories(root + "/step-7");  // no trainer_state.json: incomplete
  std::ofstream(root + "/latest") << "step-8\n";
  EXPECT_EQ(resolve_checkpoint("latest", root), root + "/step-4");
  save_checkpoint(root, *m, opt, state_at(6), 5, "tiny");
  EXPECT_FALSE(fs::exists(root + "/.step-9.tmp-abcdef"));
  EXPECT_EQ(resolve_checkpoint("latest", root), root + "/step-6");
}

TEST(Checkpoint, StateFileFormatAndVersionChecked) {
  const auto dir = test::temp_dir("ckpt");
  Json j = state_at(3).to_json();
  j["version"] = kCheckpointVersion + 1;
  std::ofstream(dir + "/trainer_state.json") << j.dump();
  std::string msg = message_of([&] { read_checkpoint_state(dir); });
  EXPECT_NE(msg.find("version " + std::to_string(kCheckpointVersion + 1)), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("upgrade qtune"), std::string::npos) << msg;
  j["format"] = "something-else";
  std::ofstream(dir + "/trainer_state.json") << j.dump();
  msg = message_of([&] { read_checkpoint_state(dir); });
  EXPECT_NE(msg.find("not a qtune checkpoint"), std::string::npos) << msg;
  msg = message_of([&] { resolve_checkpoint(dir + "/nothing-here", ""); });
  EXPECT_NE(msg.find("not a checkpoint directory"), std::string::npos) << msg;
  msg = message_of([&] { resolve_checkpoint("latest", dir); });
  EXPECT_NE(msg.find("no checkpoint in " + dir), std::string::npos) << msg;
}

TEST(Checkpoint, LoadRefusesOtherTargetModules) {
  const auto root = test::temp_dir("ckpt") + "/checkpoints";
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  auto qv = spec_of(TrainType::kLora);
  qv.adapter.target_modules = parse_target_modules({"q", "v"}, "targets");
  LlamaForCausalLM m(c, *w, qv);
  auto opt = make_optimizer(*m);
  train_step(*m, opt, 1);
  const auto dir = save_checkpoint(root, *m, opt, state_at(1), 2, "tiny");
  const auto st = read_checkpoint_state(dir);

  LlamaForCausalLM all(c, *w, spec_of(TrainType::kLora));
  auto opt_all = make_optimizer(*all);
  auto msg = message_of([&] { load_checkpoint_tensors(dir, st, *all, opt_all); });
  EXPECT_NE(msg.find("has no parameter model.layers.0.self_attn.k_proj"), std::string::npos) << msg;

  auto q_only = spec_of(TrainType::kLora);
  q_only.adapter.target_modules = parse_target_modules({"q"}, "targets");
  LlamaForCausalLM q(c, *w, q_only);
  auto opt_q = make_optimizer(*q);
  msg = message_of([&] { load_checkpoint_tensors(dir, st, *q, opt_q); });
  EXPECT_NE(msg.find("v_proj.adapter.lora_A.weight, which is not trainable"), std::string::npos)
      << msg;
}

// The base fingerprint follows content, not format: a bf16 HF copy of a model is the same base;
// other weights or another architecture are not, and the message names both models.
TEST(Checkpoint, BaseIdentityFollowsContent) {
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  const Json id = base_identity("random-3", c, *w);
  EXPECT_FALSE(id["linear_hash"].is_null());

  const auto dir = test::temp_dir("bf16copy");
  save_hf_model(dir, c, *w, torch::kBFloat16);
  ModelFiles copy = open_model(dir);
  const Json id_copy = base_identity(dir, copy.config, *copy.weights);
  EXPECT_EQ(id["dense_hash"], id_copy["dense_hash"]);
  EXPECT_EQ(id["linear_hash"], id_copy["linear_hash"]);
  check_base_identity(id, id_copy, "test");  // no throw

  auto other = random_weights(c, 4);
  std::string msg = message_of([&] {
    check_base_identity(id, base_identity("random-4", c, *other), "cannot resume from X");
  });
  EXPECT_NE(msg.find("cannot resume from X"), std::string::npos) << msg;
  EXPECT_NE(msg.find("random-3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("random-4"), std::string::npos) << msg;

  auto wide = tiny_config(32);
  auto wide_w = random_weights(wide, 3);
  msg = message_of([&] { check_base_identity(id, base_identity("wide", wide, *wide_w), "X"); });
  EXPECT_NE(msg.find("hidden_size 16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("hidden_size 32"), std::string::npos) << msg;

  // Same tensors, another function: rope scaling, or another family, is another base.
  auto scaled = c;
  scaled.rope_scaling.type = "linear";
  scaled.rope_scaling.factor = 4.0;
  msg = message_of([&] { check_base_identity(id, base_identity("scaled", scaled, *w), "X"); });
  EXPECT_NE(msg.find("rope_scaling null"), std::string::npos) << msg;
  auto mistral = c;
  mistral.model_type = "mistral";
  msg = message_of([&] { check_base_identity(id, base_identity("mistral", mistral, *w), "X"); });
  EXPECT_NE(msg.find("model_type \"llama\""), std::string::npos) << msg;
  // An identity recorded without the newer fields still matches.
  Json old = id;
  for (const char* k : {"model_type", "head_dim", "rope_scaling", "attention_bias", "mlp_bias"})
    old["config"].erase(k);
  check_base_identity(old, id, "X");
}

TEST(Checkpoint, RunIdentityRefusesOtherBackendOrAdapterOptions) {
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  const Json base = base_identity("tiny", c, *w);
  const Json nf4 = run_identity(spec_of(TrainType::kQlora), base);
  check_run_identity(nf4, nf4, "X");

  auto int8 = spec_of(TrainType::kQlora);
  int8.base.quant = plugins().quant("int8");
  int8.base.quant_options = resolve_options(int8.base.quant->option_schema(), Json::object(), "quant");
  std::string msg = message_of(
      [&] { check_run_identity(nf4, run_identity(int8, base), "cannot resume from D"); });
  EXPECT_NE(msg.find("cannot resume from D"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"nf4\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"int8\""), std::string::npos) << msg;

  auto bigger_blocks = spec_of(TrainType::kQlora);
  bigger_blocks.base.quant_options["block_size"] = 64;
  msg = message_of([&] { check_run_identity(nf4, run_identity(bigger_blocks, base), "X"); });
  EXPECT_NE(msg.find("quant_options.block_size 32"), std::string::npos) << msg;
  EXPECT_NE(msg.find("64"), std::string::npos) << msg;

  msg = message_of([&] {
    check_run_identity(run_identity(spec_of(TrainType::kLora, 4), base),
                       run_identity(spec_of(TrainType::kLora, 8), base), "X");
  });
  EXPECT_NE(msg.find("adapter_options.rank 4"), std::string::npos) << msg;
  msg = message_of(
      [&] { check_run_identity(nf4, run_identity(spec_of(TrainType::kLora), base), "X"); });
  EXPECT_NE(msg.find("train_type \"qlora\""), std::string::npos) << msg;
}

// load_peft_adapter refuses an adapter recorded for another base even when the shapes fit, and
// names the file and both shapes when they do not.
TEST(Checkpoint, PeftAdapterOnWrongBaseRefused) {
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  LlamaForCausalLM m(c, *w, spec_of(TrainType::kLora));
  const Json id = run_identity(m->spec(), base_identity("random-3", c, *w));
  const auto dir = test::temp_dir("peft");
  save_peft_adapter(dir, *m, "random-3", Json{{"identity", id}});
  EXPECT_EQ(read_peft_qtune_info(dir)["identity"], id);

  auto other = random_weights(c, 4);
  LlamaForCausalLM m2(c, *other, spec_of(TrainType::kLora));
  std::string msg =
      message_of([&] { load_peft_adapter(dir, *m2, base_identity("random-4", c, *other)); });
  EXPECT_NE(msg.find("adapter " + dir), std::string::npos) << msg;
  EXPECT_NE(msg.find("random-3"), std::string::npos) << msg;
  load_peft_adapter(dir, *m2);  // without a base to compare, shapes decide: they fit

  auto wide = tiny_config(32);
  auto wide_w = random_weights(wide, 3);
  LlamaForCausalLM m3(wide, *wide_w, spec_of(TrainType::kLora));
  msg = message_of([&] { load_peft_adapter(dir, *m3); });
  EXPECT_NE(msg.find("adapter_model.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 16]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 32]"), std::string::npos) << msg;

  LlamaForCausalLM m4(c, *w, spec_of(TrainType::kLora, 8));
  msg = message_of([&] { load_peft_adapter(dir, *m4); });
  EXPECT_NE(msg.find("[4, 16]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[8, 16]"), std::string::npos) << msg;
}
