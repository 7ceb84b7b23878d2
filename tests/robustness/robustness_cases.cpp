// The cases of the robustness table (robustness_cases.h), grouped by class.
#include "robustness_cases.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "qtune/output_dir.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace qtune::robustness {

namespace {

using test::bin_path;
using test::data_path;
using Args = std::vector<std::string>;

void write(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string config() { return test::source_dir() + "/configs/default.yaml"; }

// `trainer --print-config`: the recipe is read and checked, nothing is loaded.
Args print_config(Args extra) {
  Args a{bin_path("trainer"), "--config", config(), "--print-config"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// One cheap training step into <dir>/out (what fails, fails while loading).
// A flag in `extra` replaces the same flag of the defaults.
Args train(const Env& e, Args extra) {
  const std::vector<std::pair<std::string, std::string>> defaults{
      {"--threads", "1"}, {"--max_steps", "1"}, {"--batch_size", "2"},
      {"--seq_len", "32"}, {"--output_dir", e.dir + "/out"}};
  Args a{bin_path("trainer"), "--config", config()};
  for (const auto& [flag, value] : defaults)
    if (std::find(extra.begin(), extra.end(), flag) == extra.end()) {
      a.push_back(flag);
      a.push_back(value);
    }
  a.insert(a.end(), extra.begin(), extra.end());
  a.push_back("eval.max_batches=1");
  // What a recipe without `overwrite: true` (unlike configs/default.yaml) does.
  if (std::find(extra.begin(), extra.end(), "--overwrite") == extra.end())
    a.push_back("overwrite=false");
  return a;
}

// What several cases start from, made once per build of the programs and shared by the test
// processes (ctest runs each case in its own): <build>/robustness-cache/<name>-<trainer mtime>,
// made under a lock, complete when it exists.
std::string cached(const std::string& name, const std::function<void(const std::string&)>& make) {
  const fs::path root = fs::path(test::build_dir()) / "robustness-cache";
  fs::create_directories(root);
  const auto stamp = fs::last_write_time(bin_path("trainer")).time_since_epoch().count();
  const fs::path dir = root / (name + "-" + std::to_string(stamp));
  if (fs::exists(dir)) return dir.string();
  // One maker at a time; the others wait for it.
  const int fd = ::open((root / ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0 || ::flock(fd, LOCK_EX) != 0) throw std::runtime_error("cannot lock " + root.string());
  std::shared_ptr<void> unlock(nullptr, [fd](void*) { ::close(fd); });
  if (fs::exists(dir)) return dir.string();
  const fs::path tmp = root / (name + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  make(tmp.string());
  fs::rename(tmp, dir);
  for (const auto& entry : fs::directory_iterator(root))  // made by earlier builds
    if (entry.path() != dir && entry.path().filename().string().rfind(name + "-", 0) == 0)
      fs::remove_all(entry.path());
  return dir.string();
}

// stories260K as an HF directory (qtune-convert), copied into the case's directory.
std::string hf_model(const Env& e) {
  const std::string made = cached("model", [](const std::string& dir) {
    auto r = test::run_program({bin_path("qtune-convert"), "--model", data_path("stories260K.bin"),
                                "--tokenizer", data_path("tok512.bin"), "--out", dir + "/model"});
    if (r.exit_code != 0) throw std::runtime_error("qtune-convert failed: " + r.output);
  });
  const std::string dir = e.dir + "/model";
  fs::copy(made + "/model", dir, fs::copy_options::recursive);
  return dir;
}

void edit_json(const std::string& path, const std::function<void(json&)>& edit) {
  json j = json::parse(test::read_file(path));
  edit(j);
  write(path, j.dump(2));
}

// The header of a safetensors file: its JSON, and the offset where the data begins.
std::pair<json, uint64_t> safetensors_header(const std::string& bytes) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return {json::parse(bytes.substr(8, n)), 8 + n};
}

// The header edited in place (the data bytes stay where they were).
void edit_safetensors_header(const std::string& path, const std::function<void(json&)>& edit) {
  const std::string bytes = test::read_file(path);
  auto [header, data_begin] = safetensors_header(bytes);
  edit(header);
  std::string h = header.dump();
  const size_t n = data_begin - 8;
  if (h.size() > n) throw std::runtime_error("edited header grew");
  h.resize(n, ' ');
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  write(path, out + h + bytes.substr(data_begin));
}

// Overwrites the first float of tensor `name`, or of the first tensor whose name ends with
// `name` when `suffix` is set.
void poke_float(const std::string& path, const std::string& name, float value,
                bool suffix = false) {
  std::string bytes = test::read_file(path);
  const auto [header, data_begin] = safetensors_header(bytes);
  for (const auto& [key, info] : header.items()) {
    const bool match = suffix ? key != "__metadata__" && key.size() >= name.size() &&
                                    key.compare(key.size() - name.size(), name.size(), name) == 0
                              : key == name;
    if (!match) continue;
    const uint64_t at = data_begin + info.at("data_offsets")[0].get<uint64_t>();
    std::memcpy(bytes.data() + at, &value, 4);
    write(path, bytes);
    return;
  }
  throw std::runtime_error("no tensor " + name + " in " + path);
}

// Another base: stories260K with one norm weight changed (its fingerprint differs).
std::string other_model(const Env& e) {
  const std::string m = hf_model(e);
  poke_float(m + "/model.safetensors", "model.norm.weight", 0.5f);
  return m;
}

// A model case: stories260K as HF with config.json edited.
std::function<Args(Env&)> with_config(std::function<void(json&)> edit) {
  return [edit](Env& e) {
    const std::string m = hf_model(e);
    edit_json(m + "/config.json", edit);
    return train(e, {"--model", m});
  };
}
std::function<Args(Env&)> with_header(std::function<void(json&)> edit) {
  return [edit](Env& e) {
    const std::string m = hf_model(e);
    edit_safetensors_header(m + "/model.safetensors", edit);
    return train(e, {"--model", m});
  };
}
std::function<Args(Env&)> with_file(std::string name, std::string text,
                                   std::function<Args(Env&, const std::string&)> cmd) {
  return [name, text, cmd](Env& e) {
    const std::string p = e.dir + "/" + name;
    write(p, text);
    return cmd(e, p);
  };
}
std::function<Args(Env&)> recipe_file(std::string yaml) {
  return with_file("recipe.yaml", yaml, [](Env&, const std::string& p) {
    return Args{bin_path("trainer"), "--config", p, "--print-config"};
  });
}
std::function<Args(Env&)> data_file(std::string name, std::string text,
                                    Args extra = {"data.template=llama2"}) {
  return with_file(name, text, [extra](Env& e, const std::string& p) {
    Args a = train(e, {"--data", p});
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  });
}
std::function<Args(Env&)> tokenizer_file(std::string name, std::string text) {
  return with_file(name, text,
                   [](Env& e, const std::string& p) { return train(e, {"--tokenizer", p}); });
}
std::function<Args(Env&)> flags(Args extra) {
  return [extra](Env&) { return print_config(extra); };
}

// A finished two-step LoRA run in <dir>/out with a checkpoint at each step (copied).
std::string finished_run(const Env& e) {
  const std::string made = cached("run", [](const std::string& dir) {
    Env tmp{dir, {}};
    auto r = test::run_program(train(tmp, {"--max_steps", "2", "checkpoint.every=1"}));
    if (r.exit_code != 0) throw std::runtime_error("the reference run failed: " + r.output);
    fs::remove(dir + "/out/" + directory_lock_name());
  });
  fs::copy(made + "/out", e.dir + "/out", fs::copy_options::recursive);
  return e.dir + "/out";
}
std::string last_checkpoint(const std::string& run) { return run + "/checkpoints/step-2"; }

// Resuming the run after `edit` damaged its last checkpoint.
std::function<Args(Env&)> resume_after(std::function<void(const std::string& ckpt)> edit) {
  return [edit](Env& e) {
    edit(last_checkpoint(finished_run(e)));
    return train(e, {"--max_steps", "4", "--resume", "latest"});
  };
}
std::function<void(const std::string&)> edit_state(std::function<void(json&)> f) {
  return [f](const std::string& ckpt) { edit_json(ckpt + "/trainer_state.json", f); };
}

// An adapter directory written by a one-step run, its config edited; then exported.
std::function<Args(Env&)> export_adapter(std::function<void(json&)> edit) {
  return [edit](Env& e) {
    const std::string run = finished_run(e);
    edit_json(run + "/adapter/adapter_config.json", edit);
    return Args{bin_path("qtune-export"), "--adapter", run + "/adapter", "--out", e.dir + "/x"};
  };
}

std::vector<Case> make_cases() {
  std::vector<Case> c;
  auto add = [&](std::string section, std::string name, std::string input,
                 std::function<Args(Env&)> cmd, std::string expect, int code = 2,
                 std::function<void(Env&, const test::RunResult&)> then = {}) {
    c.push_back({section, name, input, cmd, code, expect, then});
  };

  // ------------------------------------------------------------------------------------------
  const std::string work = "Work that could be lost";
  add(work, "output_dir_locked", "a second trainer on an output_dir a running one holds",
      [](Env& e) {
        e.keep.push_back(std::make_shared<DirectoryLock>(e.dir + "/out", "output_dir"));
        return train(e, {});
      },
      "is in use by another run (qtune_robustness_tests pid");
  add(work, "stale_lock_reclaimed", "a lock file left by a killed run",
      [](Env& e) {
        write(e.dir + "/out/.qtune.lock", "trainer pid 999999 on elsewhere since 2026-01-01\n");
        return train(e, {});
      },
      "saved", 0);
  add(work, "run_exists", "a new run in an output_dir that holds a run",
      [](Env& e) { finished_run(e); return train(e, {}); },
      "already holds a run (recipe.json, metrics.jsonl, summary.json, checkpoints, adapter); "
      "continue it with --resume latest, replace it with --overwrite");
  add(work, "run_exists_overwrite", "the same with --overwrite: the earlier run's files go first",
      [](Env& e) {
        finished_run(e);
        write(e.dir + "/out/notes.txt", "mine");
        return train(e, {"--overwrite"});
      },
      "removing the earlier run's", 0, [](Env& e, const test::RunResult&) {
        EXPECT_FALSE(fs::exists(e.dir + "/out/checkpoints/step-2")) << "the old checkpoint stayed";
        EXPECT_TRUE(fs::exists(e.dir + "/out/notes.txt")) << "a file not of the run was removed";
      });
  add(work, "run_exists_resume", "the same with --resume latest: it continues",
      [](Env& e) { finished_run(e); return train(e, {"--max_steps", "3", "--resume", "latest"}); },
      "resumed from", 0);
  add(work, "export_into_base", "qtune-export --out the base model's own directory",
      [](Env& e) {
        const std::string m = hf_model(e);
        const std::string run = e.dir + "/run";
        auto r = test::run_program(train(e, {"--model", m, "--output_dir", run}));
        EXPECT_EQ(r.exit_code, 0) << r.output;
        return Args{bin_path("qtune-export"), "--adapter", run + "/adapter", "--out", m,
                    "--merge", "--overwrite"};
      },
      "would write over");
  add(work, "export_nonempty", "qtune-export --out a directory that holds files",
      [](Env& e) {
        write(e.dir + "/x/keep.txt", "mine");
        return Args{bin_path("qtune-export"), "--adapter", finished_run(e) + "/adapter", "--out",
                    e.dir + "/x"};
      },
      "is not empty; choose an empty or new directory, or pass --overwrite");
  add(work, "export_overwrite", "the same with --overwrite",
      [](Env& e) {
        write(e.dir + "/x/keep.txt", "mine");
        return Args{bin_path("qtune-export"), "--adapter", finished_run(e) + "/adapter", "--out",
                    e.dir + "/x", "--overwrite"};
      },
      "wrote", 0, [](Env& e, const test::RunResult&) {
        EXPECT_FALSE(fs::exists(e.dir + "/x/keep.txt"));
        EXPECT_TRUE(fs::exists(e.dir + "/x/adapter_config.json"));
      });
  add(work, "export_into_adapter", "qtune-export --out the adapter it reads",
      [](Env& e) {
        const std::string run = finished_run(e);
        return Args{bin_path("qtune-export"), "--adapter", run + "/adapter", "--out",
                    run + "/adapter", "--overwrite"};
      },
      "would write over");
  add(work, "quantize_into_model", "qtune-quantize --out the directory of its --model",
      [](Env& e) {
        const std::string m = hf_model(e);
        return Args{bin_path("qtune-quantize"), "--model", m, "--quant", "nf4", "--out", m};
      },
      "would write over");
  add(work, "convert_nonempty", "qtune-convert --out a directory that holds files",
      [](Env& e) {
        write(e.dir + "/x/keep.txt", "mine");
        return Args{bin_path("qtune-convert"), "--model", data_path("stories260K.bin"), "--out",
                    e.dir + "/x"};
      },
      "is not empty");
  add(work, "file_size_limit", "a checkpoint save past the file-size limit (ulimit -f)",
      [](Env& e) {
        finished_run(e);
        Args a = train(e, {"--max_steps", "4", "--resume", "latest"});
        std::string cmd = "ulimit -f 64; exec";
        for (const auto& x : a) cmd += " '" + x + "'";
        return Args{"/bin/sh", "-c", cmd};
      },
      "File too large", 2, [](Env& e, const test::RunResult&) {
        // The checkpoint it resumed from still loads: a resume without the limit works.
        auto r = test::run_program(train(e, {"--max_steps", "3", "--resume", "latest"}));
        EXPECT_EQ(r.exit_code, 0) << r.output;
      });

  // ------------------------------------------------------------------------------------------
  const std::string recipe = "Recipe values (flags, key=value, YAML)";
  struct Bad {
    const char* name;
    const char* assignment;
    const char* expect;
  };
  const Bad bad_values[] = {
      {"train_type", "train_type=qlorax", "train_type must be full, lora or qlora"},
      {"dtype", "dtype=fp8", "dtype must be fp32, float32, bf16 or bfloat16"},
      {"lr_zero", "train.lr=0", "train.lr must be > 0"},
      {"lr_negative", "train.lr=-1e-3", "train.lr must be > 0"},
      {"lr_string", "train.lr=fast", "train.lr must be a number"},
      {"beta1_one", "train.beta1=1", "train.beta1 must be in [0, 1)"},
      {"beta1_negative", "train.beta1=-0.1", "train.beta1 must be in [0, 1)"},
      {"beta2_big", "train.beta2=1.5", "train.beta2 must be in [0, 1)"},
      {"eps_zero", "train.eps=0", "train.eps must be > 0"},
      {"weight_decay_negative", "train.weight_decay=-0.01", "train.weight_decay must be >= 0"},
      {"max_steps_zero", "train.max_steps=0", "train.max_steps must be > 0"},
      {"max_steps_float", "train.max_steps=1.5", "train.max_steps must be an integer"},
      {"batch_size_zero", "train.batch_size=0", "train.batch_size must be > 0"},
      {"grad_accum_zero", "train.grad_accum=0", "train.grad_accum must be > 0"},
      {"warmup_negative", "train.warmup_steps=-1", "train.warmup_steps must be >= 0"},
      {"min_lr_ratio_big", "train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"},
      {"max_grad_norm_negative", "train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"},
      {"checkpointing_string", "train.activation_checkpointing=maybe",
       "train.activation_checkpointing must be a boolean"},
      {"seq_len_zero", "data.seq_len=0", "data.seq_len must be > 0"},
      {"val_fraction_one", "data.val_fraction=1", "data.val_fraction must be in (0, 1)"},
      {"data_format", "data.format=csv", "data.format must be auto, text, alpaca"},
      {"data_overlong", "data.overlong=wrap", "data.overlong must be truncate or drop"},
      {"data_template", "data.template=vicuna", "data.template"},
      {"eval_every_negative", "eval.every=-5", "eval.every must be >= 0"},
      {"eval_max_batches_zero", "eval.max_batches=0", "eval.max_batches must be > 0"},
      {"checkpoint_every_negative", "checkpoint.every=-1", "checkpoint.every must be >= 0"},
      {"checkpoint_keep_zero", "checkpoint.keep=0", "checkpoint.keep must be >= 1"},
      {"dist_backend", "dist.backend=mpi", "dist.backend must be auto, gloo or nccl"},
      {"dist_timeout_zero", "dist.timeout_s=0", "dist.timeout_s"},
      {"dist_port_big", "dist.master_port=70000", "dist.master_port"},
      {"dist_bucket_zero", "dist.bucket_mb=0", "dist.bucket_mb"},
      {"log_every_zero", "log_every=0", "log_every must be > 0"},
      {"threads_negative", "threads=-1", "threads must be >= 0"},
      {"threads_huge", "threads=100000", "threads must be at most"},
      {"output_dir_empty", "output_dir=''", "output_dir must not be empty"},
      {"seed_negative", "seed=-1", "seed must be >= 0, got -1"},
      {"unknown_key", "train.learning_rate=1e-4", "unknown key 'train.learning_rate'"},
      {"unknown_section", "optim.lr=1e-4", "unknown key 'optim'"},
      {"section_as_value", "train=3", "train must be a mapping"},
      {"no_equals", "train.lr", "must look like key.path=value"},
      {"empty_key_part", "train..lr=1", "has an empty key part"},
      {"target_modules_number", "adapter.target_modules=[q, 3]",
       "adapter.target_modules must be a list of names"},
      {"target_modules_unknown", "adapter.target_modules=[q, attn]", "attn"},
      {"lora_rank_zero", "adapter.options.rank=0", "rank must be > 0"},
      {"lora_rank_huge", "adapter.options.rank=1000000000", "rank must be at most 65536"},
      {"dora_rank_huge", "adapter.options.rank=1000000000", "rank must be at most 65536"},
      {"dora_dropout_one", "adapter.options.dropout=1", "dropout must be in [0, 1)"},
      {"lora_alpha_negative", "adapter.options.alpha=-16", "alpha must be > 0"},
      {"lora_dropout_one", "adapter.options.dropout=1", "dropout must be in [0, 1)"},
      {"lora_init", "adapter.options.init=zeros", "init must be"},
      {"lora_unknown_option", "adapter.options.rnak=8", "rnak"},
      {"adapter_unknown", "adapter.name=ia3", "ia3"},
      {"quant_unknown", "quant.name=gptq", "gptq"},
      {"nf4_block_size", "quant.options.block_size=48", "block_size"},
      {"hqq_nbits", "quant.options.nbits=5", "nbits"},
      {"quant_options_not_mapping", "quant.options=[1]", "quant.options must be a mapping"},
      {"overwrite_string", "overwrite=yes please", "overwrite must be a boolean"},
  };
  for (const auto& b : bad_values) {
    Args extra{b.assignment};
    // Backend options are checked by the backend the recipe names.
    if (std::string(b.name).rfind("nf4", 0) == 0) extra = {"train_type=qlora", "quant.name=nf4", b.assignment};
    if (std::string(b.name).rfind("hqq", 0) == 0) extra = {"train_type=qlora", "quant.name=hqq", b.assignment};
    if (std::string(b.name).rfind("quant_", 0) == 0) extra.insert(extra.begin(), "train_type=qlora");
    if (std::string(b.name).rfind("dora", 0) == 0) extra.insert(extra.begin(), "adapter.name=dora");
    add(recipe, b.name, std::string("`") + b.assignment + "`", flags(extra), b.expect);
  }
  add(recipe, "flag_unknown", "`--learning_rate 1e-4` (no such flag)", flags({"--learning_rate", "1e-4"}),
      "unrecognised option '--learning_rate' (see trainer --help)");
  add(recipe, "flag_not_a_number", "`--max_steps many`", flags({"--max_steps", "many"}),
      "max_steps");
  add(recipe, "flag_missing_value", "`--lr` with no value", flags({"--lr"}), "lr");
  add(recipe, "recipe_file_missing", "`--config` of a file that does not exist",
      [](Env& e) { return Args{bin_path("trainer"), "--config", e.dir + "/none.yaml"}; },
      "config file not found");
  add(recipe, "yaml_syntax", "a YAML syntax error", recipe_file("train:\n  lr: [1, 2\n"),
      "invalid YAML");
  add(recipe, "yaml_top_level_list", "a YAML file that is a list", recipe_file("- lr\n- 3\n"),
      "the top level must be a mapping of recipe keys");
  add(recipe, "yaml_duplicate_key", "a key given twice", recipe_file("seed: 1\nseed: 2\n"),
      "recipe.yaml:2: duplicate key 'seed' (first given at");
  add(recipe, "yaml_alias_bomb", "aliases that expand to billions of values (\"billion laughs\")",
      recipe_file([] {
        std::string y = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n";
        std::string prev = "a";
        for (char ch = 'b'; ch <= 'j'; ++ch) {
          y += std::string(1, ch) + ": &" + ch + " [";
          for (int i = 0; i < 10; ++i) y += (i ? ", *" : "*") + prev;
          y += "]\n";
          prev = std::string(1, ch);
        }
        return y;
      }()),
      "the YAML expands to more than 100000 values");
  add(recipe, "yaml_deep", "a YAML file nested 10000 levels deep",
      recipe_file("a: " + std::string(10000, '[') + std::string(10000, ']') + "\n"),
      "the YAML nests deeper than");
  add(recipe, "yaml_deep_override", "a key=value override nested 40 levels deep",
      flags({"seed=" + std::string(40, '[') + "1" + std::string(40, ']')}),
      "the YAML nests deeper than 32 levels");
  add(recipe, "override_key_not_utf8", "a key=value override whose key is not UTF-8",
      flags({"overwrite.se\xff" "ed=1"}), "its key: not valid UTF-8 text");
  add(recipe, "yaml_wrong_type", "`train: {lr: [1, 2]}` in a file",
      recipe_file("train:\n  lr: [1, 2]\n"), "train.lr must be a number");
  add(recipe, "yaml_binary", "a recipe file of binary bytes",
      recipe_file(std::string("\x00\xff\xfe\x01garbage", 11)), "recipe.yaml");
  add(recipe, "target_modules_string", "`adapter.target_modules: all-linear` (PEFT's spelling)",
      recipe_file("adapter:\n  target_modules: all-linear\n"), "\"all-linear\"", 0);
  add(recipe, "seq_len_beyond_context", "data.seq_len beyond the model's context",
      [](Env& e) { return train(e, {"--seq_len", "4096"}); },
      "data.seq_len 4096 is longer than the context of");
  add(recipe, "dist_master_unreachable",
      "rank 1 of a SLURM job whose `dist.master_addr` does not resolve (every `dist.*` key set)",
      [](Env& e) {
        Args a{"/usr/bin/env", "SLURM_PROCID=1", "SLURM_NTASKS=2", "SLURM_LOCALID=0"};
        for (const auto& x : train(e, {"dist.backend=gloo", "dist.bucket_mb=1",
                                       "dist.master_addr=no-such-host.invalid",
                                       "dist.master_port=29517", "dist.timeout_s=3"}))
          a.push_back(x);
        return a;
      },
      "rank 1 cannot reach the master no-such-host.invalid:29517 (dist.master_addr="
      "no-such-host.invalid, dist.master_port=29517) within 3 s");
  add(recipe, "plugin_dir_missing", "`--plugin_dir` that is not a directory",
      flags({"--plugin_dir", "/nonexistent/plugins"}), "plugin_dir: not a directory");
  add(recipe, "nproc_zero", "`--nproc_per_node 0`",
      [](Env& e) { Args a = train(e, {"--nproc_per_node", "0"}); return a; }, "nproc_per_node");

  // ------------------------------------------------------------------------------------------
  const std::string model = "Model files (config.json, safetensors, llama2.c)";
  struct BadConfig {
    const char* name;
    const char* key;
    json value;
    const char* expect;
  };
  const BadConfig bad_configs[] = {
      {"layers_zero", "num_hidden_layers", 0, "num_hidden_layers"},
      {"layers_negative", "num_hidden_layers", -3, "num_hidden_layers"},
      {"layers_huge", "num_hidden_layers", 100000000, "num_hidden_layers"},
      {"layers_string", "num_hidden_layers", "five", "num_hidden_layers"},
      {"hidden_zero", "hidden_size", 0, "hidden_size"},
      {"hidden_huge", "hidden_size", int64_t{1} << 40, "hidden_size"},
      {"hidden_against_weights", "hidden_size", 65, "expected [512, 65] from the config"},
      {"intermediate_zero", "intermediate_size", 0, "intermediate_size"},
      {"intermediate_huge", "intermediate_size", int64_t{1} << 50, "intermediate_size"},
      {"heads_zero", "num_attention_heads", 0, "num_attention_heads"},
      {"kv_heads_not_dividing", "num_key_value_heads", 3, "num_key_value_heads"},
      {"vocab_zero", "vocab_size", 0, "vocab_size"},
      {"vocab_huge", "vocab_size", int64_t{1} << 40, "vocab_size"},
      {"context_zero", "max_position_embeddings", 0, "max_position_embeddings"},
      {"rope_theta_negative", "rope_theta", -10000.0, "rope_theta"},
      {"rms_eps_negative", "rms_norm_eps", -1e-5, "rms_norm_eps"},
      {"model_type_unknown", "model_type", "gpt_neox", "gpt_neox"},
      {"head_dim_wrong", "head_dim", 7, "head_dim"},
      {"rope_scaling_type", "rope_scaling", json{{"rope_type", "warp"}, {"factor", 2.0}}, "rope_scaling"},
  };
  for (const auto& b : bad_configs) {
    const std::string key = b.key;
    const json value = b.value;
    add(model, std::string("config_") + b.name,
        "config.json `" + key + ": " + value.dump() + "`",
        with_config([key, value](json& j) { j[key] = value; }), b.expect);
  }
  add(model, "config_missing_key", "config.json without hidden_size",
      with_config([](json& j) { j.erase("hidden_size"); }), "hidden_size");
  add(model, "config_not_json", "config.json that is not JSON",
      [](Env& e) {
        const std::string m = hf_model(e);
        write(m + "/config.json", "{\"hidden_size\": 64,");
        return train(e, {"--model", m});
      },
      "config.json: not valid JSON");
  add(model, "config_missing", "an HF directory without config.json",
      [](Env& e) {
        const std::string m = hf_model(e);
        fs::remove(m + "/config.json");
        return train(e, {"--model", m});
      },
      "config.json");
  add(model, "model_missing", "`--model` that does not exist",
      [](Env& e) { return train(e, {"--model", e.dir + "/nothing"}); }, "file not found");
  add(model, "weights_missing", "an HF directory without its safetensors",
      [](Env& e) {
        const std::string m = hf_model(e);
        fs::remove(m + "/model.safetensors");
        return train(e, {"--model", m});
      },
      "safetensors");
  add(model, "st_truncated", "model.safetensors cut short",
      [](Env& e) {
        const std::string m = hf_model(e);
        fs::resize_file(m + "/model.safetensors", fs::file_size(m + "/model.safetensors") / 2);
        return train(e, {"--model", m});
      },
      "model.safetensors");
  add(model, "st_header_huge", "a safetensors header length of 2^60",
      [](Env& e) {
        const std::string m = hf_model(e);
        std::string b = test::read_file(m + "/model.safetensors");
        const uint64_t n = uint64_t{1} << 60;
        std::memcpy(b.data(), &n, 8);
        write(m + "/model.safetensors", b);
        return train(e, {"--model", m});
      },
      "model.safetensors");
  add(model, "st_header_not_json", "a safetensors header that is not JSON",
      [](Env& e) {
        const std::string m = hf_model(e);
        std::string b = test::read_file(m + "/model.safetensors");
        b[8] = '[';
        b[9] = '[';
        write(m + "/model.safetensors", b);
        return train(e, {"--model", m});
      },
      "model.safetensors");
  add(model, "st_offsets_past_end", "tensor offsets beyond the file",
      with_header([](json& h) {
        for (auto& [k, v] : h.items())
          if (k != "__metadata__") {
            v["data_offsets"][1] = v["data_offsets"][1].get<uint64_t>() + 100000000;
            break;
          }
      }),
      "model.safetensors");
  add(model, "st_offsets_reversed", "a tensor whose end offset precedes its start",
      with_header([](json& h) {
        for (auto& [k, v] : h.items())
          if (k != "__metadata__") {
            std::swap(v["data_offsets"][0], v["data_offsets"][1]);
            break;
          }
      }),
      "model.safetensors");
  add(model, "st_shape_mismatch", "a tensor whose shape disagrees with its byte size",
      with_header([](json& h) { h["model.norm.weight"]["shape"] = {65}; }), "model.safetensors");
  add(model, "st_dtype_unknown", "a tensor of dtype \"F4\"",
      with_header([](json& h) { h["model.norm.weight"]["dtype"] = "F4"; }), "F4");
  add(model, "st_dtype_int_embedding", "an embedding stored as I32 (same byte size as F32)",
      with_header([](json& h) { h["model.embed_tokens.weight"]["dtype"] = "I32"; }),
      "tensor \"model.embed_tokens.weight\" has dtype I32; model weights must be a floating type");
  add(model, "st_tensor_missing", "a weight missing from the file",
      with_header([](json& h) { h.erase("model.layers.0.mlp.up_proj.weight"); }),
      "model.layers.0.mlp.up_proj.weight");
  add(model, "st_wrong_shape_for_config", "a weight of the wrong shape for config.json",
      [](Env& e) {
        const std::string m = hf_model(e);
        edit_json(m + "/config.json", [](json& j) { j["intermediate_size"] = 96; });
        return train(e, {"--model", m});
      },
      "mlp");
  add(model, "weight_nan", "a NaN in a weight",
      [](Env& e) {
        const std::string m = hf_model(e);
        poke_float(m + "/model.safetensors", "model.layers.1.self_attn.q_proj.weight", NAN);
        return train(e, {"--model", m});
      },
      "tensor \"model.layers.1.self_attn.q_proj.weight\" holds 1 NaN and 0 infinite values");
  add(model, "weight_inf", "an infinity in a weight",
      [](Env& e) {
        const std::string m = hf_model(e);
        poke_float(m + "/model.safetensors", "model.norm.weight", INFINITY);
        return train(e, {"--model", m});
      },
      "tensor \"model.norm.weight\" holds 0 NaN and 1 infinite values");
  add(model, "index_escapes", "a sharded index naming a file outside the directory",
      [](Env& e) {
        const std::string m = hf_model(e);
        json idx = {{"metadata", json::object()},
                    {"weight_map", {{"model.norm.weight", "../../etc/passwd"}}}};
        write(m + "/model.safetensors.index.json", idx.dump());
        fs::remove(m + "/model.safetensors");
        return train(e, {"--model", m});
      },
      "is not a file name in the model directory");
  add(model, "index_missing_shard", "a sharded index naming a shard that is not there",
      [](Env& e) {
        const std::string m = hf_model(e);
        json idx = {{"metadata", json::object()},
                    {"weight_map", {{"model.norm.weight", "model-00002-of-00002.safetensors"}}}};
        write(m + "/model.safetensors.index.json", idx.dump());
        fs::remove(m + "/model.safetensors");
        return train(e, {"--model", m});
      },
      "does not exist");
  // llama2.c: the header is 7 int32 (dim, hidden, layers, heads, kv heads, vocab, seq_len).
  const std::pair<const char*, int> llama2c_fields[] = {{"dim", 0}, {"hidden_dim", 1},
                                                        {"n_layers", 2}, {"n_heads", 3},
                                                        {"n_kv_heads", 4}, {"seq_len", 6}};
  for (const auto& [field, index] : llama2c_fields) {
    for (const int32_t value : {0, -7, 1 << 30}) {
      const int i = index;
      const std::string label = value == 0 ? "zero" : value < 0 ? "negative" : "huge";
      add(model, std::string("llama2c_") + field + "_" + label,
          std::string("a llama2.c header with ") + field + " = " + std::to_string(value),
          [i, value](Env& e) {
            std::string b = test::read_file(data_path("stories260K.bin"));
            std::memcpy(b.data() + 4 * i, &value, 4);
            write(e.dir + "/m.bin", b);
            return train(e, {"--model", e.dir + "/m.bin"});
          },
          "m.bin");
    }
  }
  add(model, "llama2c_truncated", "a llama2.c checkpoint cut short",
      [](Env& e) {
        std::string b = test::read_file(data_path("stories260K.bin"));
        write(e.dir + "/m.bin", b.substr(0, b.size() / 3));
        return train(e, {"--model", e.dir + "/m.bin"});
      },
      "m.bin");
  add(model, "llama2c_tiny", "a 10-byte file named .bin",
      [](Env& e) {
        write(e.dir + "/m.bin", "0123456789");
        return train(e, {"--model", e.dir + "/m.bin"});
      },
      "m.bin");

  // ------------------------------------------------------------------------------------------
  const std::string tok = "Tokenizers";
  add(tok, "tokenizer_missing", "`--tokenizer` that does not exist",
      [](Env& e) { return train(e, {"--tokenizer", e.dir + "/none.model"}); }, "none.model");
  add(tok, "tokbin_truncated", "a llama2.c tok.bin cut short",
      [](Env& e) {
        std::string b = test::read_file(data_path("tok512.bin"));
        write(e.dir + "/tok.bin", b.substr(0, b.size() / 2));
        return train(e, {"--tokenizer", e.dir + "/tok.bin"});
      },
      "tok.bin");
  add(tok, "tokbin_huge_length", "a tok.bin entry claiming a 2 GB token",
      [](Env& e) {
        std::string b = test::read_file(data_path("tok512.bin"));
        const int32_t len = 0x7fffffff;
        std::memcpy(b.data() + 4 + 4, &len, 4);  // after max_token_length and the first score
        write(e.dir + "/tok.bin", b);
        return train(e, {"--tokenizer", e.dir + "/tok.bin"});
      },
      "tok.bin");
  add(tok, "tokbin_empty", "an empty tok.bin", tokenizer_file("tok.bin", ""), "tok.bin");
  add(tok, "tokenizer_json_invalid", "tokenizer.json that is not JSON",
      tokenizer_file("tokenizer.json", "{\"model\": "), "tokenizer.json");
  add(tok, "tokenizer_json_no_model", "tokenizer.json without a model",
      tokenizer_file("tokenizer.json", "{\"version\": \"1.0\"}"), "tokenizer.json");
  add(tok, "tokenizer_json_unknown_type", "tokenizer.json of model type Unigram",
      tokenizer_file("tokenizer.json", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}"),
      "Unigram");
  add(tok, "tokenizer_json_vocab_not_map", "a BPE vocab that is a list",
      tokenizer_file("tokenizer.json",
                     "{\"model\": {\"type\": \"BPE\", \"vocab\": [1, 2], \"merges\": []}}"),
      "vocab");
  add(tok, "sentencepiece_garbage", "a .model file of random bytes",
      tokenizer_file("tokenizer.model", std::string(300, '\x07')), "tokenizer.model");
  add(tok, "tiktoken_bad_line", "a .tiktoken line that is not base64 and a rank",
      tokenizer_file("x.tiktoken", "IQ== 0\nnot base64 at all\n"), "x.tiktoken");
  add(tok, "tokenizer_too_big", "a tokenizer with more tokens than the model's vocabulary",
      [](Env& e) { return train(e, {"--tokenizer", data_path("llama2_tokenizer.model")}); },
      "tokens but the model's vocabulary is 512");
  add(tok, "gpt2_vocab_not_json", "a GPT-2 vocab.json that is not JSON",
      [](Env& e) {
        write(e.dir + "/merges.txt", "#version: 0.2\n");
        write(e.dir + "/vocab.json", "[[[");
        return train(e, {"--tokenizer", e.dir + "/vocab.json"});
      },
      "vocab.json");

  // ------------------------------------------------------------------------------------------
  const std::string data = "Training data";
  add(data, "data_missing", "`--data` that does not exist",
      [](Env& e) { return train(e, {"--data", e.dir + "/none.txt"}); }, "file not found");
  add(data, "data_empty", "an empty text file", data_file("d.txt", ""), "d.txt");
  add(data, "data_too_short", "a text shorter than one sequence", data_file("d.txt", "To be."),
      "d.txt");
  add(data, "jsonl_bad_line", "a JSONL file with a broken line",
      data_file("d.jsonl",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": "
                "\"assistant\", \"content\": \"hello\"}]}\n{\"messages\": [\n"),
      "d.jsonl line 2: invalid JSON");
  add(data, "jsonl_not_object", "a JSONL line that is a number", data_file("d.jsonl", "42\n"),
      "d.jsonl: not JSON records");
  add(data, "messages_bad_role", "a message whose role is \"robot\"",
      data_file("d.jsonl",
                "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n"),
      "robot");
  add(data, "messages_content_number", "a message whose content is a number",
      data_file("d.jsonl",
                "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n"),
      "content");
  add(data, "alpaca_missing_output", "an Alpaca record without output",
      data_file("d.json", "[{\"instruction\": \"say hi\"}]"), "output");
  add(data, "alpaca_not_list", "an Alpaca file that is an object",
      data_file("d.json", "{\"instruction\": \"say hi\"}"), "d.json");
  add(data, "data_binary", "a data file of binary bytes", data_file("d.txt", std::string(4000, '\0')),
      "d.txt' is not a text file (a NUL byte at offset 0)");
  add(data, "val_missing", "`--val_data` that does not exist",
      [](Env& e) { return train(e, {"--val_data", e.dir + "/none.txt"}); }, "file not found");
  add(data, "batch_larger_than_data", "a batch larger than the data set",
      [](Env& e) { return train(e, {"--batch_size", "100000"}); }, "fewer than batch_size 100000");

  // ------------------------------------------------------------------------------------------
  const std::string ckpt = "Checkpoints and resume";
  add(ckpt, "resume_none", "`--resume latest` with no checkpoint",
      [](Env& e) { return train(e, {"--resume", "latest"}); }, "resume");
  add(ckpt, "resume_not_checkpoint", "`--resume` of a directory that is no checkpoint",
      [](Env& e) { return train(e, {"--resume", e.dir}); }, "not a checkpoint directory");
  add(ckpt, "resume_step_negative", "a checkpoint whose step is -5",
      resume_after(edit_state([](json& j) { j["step"] = -5; })), "\"step\" must be >= 0");
  add(ckpt, "resume_tokens_negative", "progress.tokens = -1",
      resume_after(edit_state([](json& j) { j["progress"]["tokens"] = -1; })),
      "progress.tokens must be an integer >= 0");
  add(ckpt, "resume_seconds_nan", "progress.train_seconds that is not a number",
      resume_after(edit_state([](json& j) { j["progress"]["train_seconds"] = "NaN"; })),
      "progress.train_seconds must be a finite number >= 0");
  add(ckpt, "resume_loss_negative", "progress.best_val_loss = -3",
      resume_after(edit_state([](json& j) { j["progress"]["best_val_loss"] = -3.0; })),
      "progress.best_val_loss must be a finite number >= 0");
  add(ckpt, "resume_loader_negative", "a data-loader position of -2",
      resume_after(edit_state([](json& j) { j["loader"]["index"] = -2; })),
      "data loader state: field 'index' must be a non-negative integer");
  add(ckpt, "resume_rng_bad", "an RNG state that is not hex",
      resume_after(edit_state([](json& j) { j["rng"]["cpu"] = "zz"; })), "rng.cpu");
  add(ckpt, "resume_format_version", "a checkpoint of a future format version",
      resume_after(edit_state([](json& j) { j["version"] = 99; })), "written by a newer qtune");
  add(ckpt, "resume_state_not_json", "trainer_state.json that is not JSON",
      resume_after([](const std::string& d) { write(d + "/trainer_state.json", "{"); }),
      "not valid JSON");
  add(ckpt, "resume_moment_nan", "a NaN in an optimizer moment",
      resume_after([](const std::string& d) {
        poke_float(d + "/optimizer.safetensors", ".exp_avg", NAN, true);
      }),
      "holds 1 NaN");
  add(ckpt, "resume_moment_negative", "a negative second moment (exp_avg_sq)",
      resume_after([](const std::string& d) {
        poke_float(d + "/optimizer.safetensors", ".exp_avg_sq", -1.0f, true);
      }),
      "has negative values; a second moment is a mean of squares");
  add(ckpt, "resume_weight_nan", "a NaN in a checkpointed adapter weight",
      resume_after([](const std::string& d) {
        poke_float(d + "/adapter_model.safetensors", ".weight", NAN, true);
      }),
      "holds 1 NaN");
  add(ckpt, "resume_other_model", "resuming on another base model",
      [](Env& e) {
        finished_run(e);
        return train(e, {"--max_steps", "4", "--resume", "latest", "--model", other_model(e)});
      },
      "cannot resume from");

  // ------------------------------------------------------------------------------------------
  const std::string adapter = "Adapters (adapter_config.json)";
  add(adapter, "adapter_config_rank", "adapter_config.json r = 16 beside rank-8 tensors",
      export_adapter([](json& j) { j["r"] = 16; }),
      "adapter_config.json: r is 16, but tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
  add(adapter, "adapter_config_alpha", "adapter_config.json lora_alpha = 64 (trained with 16)",
      export_adapter([](json& j) { j["lora_alpha"] = 64; }), "lora_alpha is 64");
  add(adapter, "adapter_config_type", "adapter_config.json peft_type = IA3",
      export_adapter([](json& j) { j["peft_type"] = "IA3"; }), "peft_type is \"IA3\"");
  add(adapter, "adapter_config_targets", "adapter_config.json target_modules missing v_proj",
      export_adapter([](json& j) {
        json t = json::array();
        for (const auto& m : j["target_modules"])
          if (m != "v_proj") t.push_back(m);
        j["target_modules"] = t;
      }),
      "], but the tensors of");
  add(adapter, "adapter_config_rslora", "adapter_config.json use_rslora = true (trained without)",
      export_adapter([](json& j) { j["use_rslora"] = true; }), "use_rslora is true");
  add(adapter, "adapter_config_missing", "an adapter directory without adapter_config.json",
      [](Env& e) {
        const std::string run = finished_run(e);
        fs::remove(run + "/adapter/adapter_config.json");
        return Args{bin_path("qtune-export"), "--adapter", run + "/adapter", "--out", e.dir + "/x"};
      },
      "adapter_config.json is missing");
  add(adapter, "adapter_config_not_object", "adapter_config.json that is a list",
      export_adapter([](json& j) { j = json::array({1}); }), "adapter_config.json");
  add(adapter, "adapter_tensor_removed", "an adapter whose safetensors lacks a tensor",
      [](Env& e) {
        const std::string run = finished_run(e);
        edit_safetensors_header(run + "/adapter/adapter_model.safetensors", [](json& h) {
          for (auto it = h.begin(); it != h.end(); ++it)
            if (it.key() != "__metadata__") {
              h.erase(it);
              break;
            }
        });
        return Args{bin_path("qtune-export"), "--adapter", run + "/adapter", "--out", e.dir + "/x"};
      },
      "missing tensor");
  add(adapter, "generate_bad_adapter", "qtune-generate with an adapter of another base",
      [](Env& e) {
        const std::string run = finished_run(e);
        return Args{bin_path("qtune-generate"), "--adapter", run + "/adapter", "--model",
                    other_model(e), "--prompt", "Once", "--max_new_tokens", "2"};
      },
      "adapter");

  // ------------------------------------------------------------------------------------------
  const std::string quant = "Pre-quantized models and plugins";
  auto quantized = [](Env& e) {
    const std::string m = hf_model(e), q = e.dir + "/q";
    auto r = test::run_program(
        {bin_path("qtune-quantize"), "--model", m, "--quant", "nf4", "--out", q});
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return q;
  };
  add(quant, "prequant_state_missing", "a qtune-quantize directory missing part of a state",
      [quantized](Env& e) {
        const std::string q = quantized(e);
        for (const auto& entry : fs::directory_iterator(q))
          if (entry.path().extension() == ".safetensors")
            edit_safetensors_header(entry.path().string(), [](json& h) {
              for (auto it = h.begin(); it != h.end(); ++it)
                if (it.key().find("layers.0.self_attn.q_proj.weight.") != std::string::npos) {
                  h.erase(it);
                  break;
                }
            });
        return train(e, {"--model", q, "--train_type", "qlora", "--quant", "nf4"});
      },
      "model.layers.0.self_attn.q_proj");
  add(quant, "prequant_other_backend", "a directory quantized with nf4, trained with `--quant hqq`",
      [quantized](Env& e) {
        return train(e, {"--model", quantized(e), "--train_type", "qlora", "--quant", "hqq"});
      },
      "quantized with");
  add(quant, "prequant_full", "`--train_type full` on a quantized directory",
      [quantized](Env& e) { return train(e, {"--model", quantized(e), "--train_type", "full"}); },
      "quantized");
  add(quant, "plugin_garbage", "a plugin folder holding a .so that is not a library",
      [](Env& e) {
        write(e.dir + "/plugins/libqtune_evil.so", "not an ELF file");
        return print_config({"--plugin_dir", e.dir + "/plugins", "train_type=qlora",
                             "quant.name=evil"});
      },
      "evil");
  add(quant, "quantize_bad_options", "qtune-quantize `--quant_options` that is not JSON",
      [](Env& e) {
        return Args{bin_path("qtune-quantize"), "--model", hf_model(e), "--quant", "nf4",
                    "--quant_options", "{blocksize: 64", "--out", e.dir + "/q"};
      },
      "--quant_options is not valid JSON");
  add(quant, "quantize_no_out", "qtune-quantize without --out",
      [](Env& e) { return Args{bin_path("qtune-quantize"), "--model", hf_model(e)}; },
      "--out is required");
  add(quant, "export_no_adapter", "qtune-export without --adapter",
      [](Env& e) { return Args{bin_path("qtune-export"), "--out", e.dir + "/x"}; },
      "--adapter is required");
  add(quant, "export_bad_dtype", "qtune-export --merge --dtype int4",
      [](Env& e) {
        return Args{bin_path("qtune-export"), "--adapter", finished_run(e) + "/adapter", "--out",
                    e.dir + "/x", "--merge", "--dtype", "int4"};
      },
      "--dtype");
  add(quant, "convert_bad_shard_size", "qtune-convert --max-shard-gb 0",
      [](Env& e) {
        return Args{bin_path("qtune-convert"), "--model", data_path("stories260K.bin"), "--out",
                    e.dir + "/x", "--max-shard-gb", "0"};
      },
      "--max-shard-gb must be > 0");
  return c;
}

}  // namespace

const std::vector<Case>& cases() {
  static const std::vector<Case> all = make_cases();
  return all;
}

std::string table_markdown() {
  std::string md, section;
  for (const auto& k : cases()) {
    if (k.section != section) {
      section = k.section;
      md += "\n### " + section + "\n\n| input or fault | qtune | case |\n| --- | --- | --- |\n";
    }
    std::string expect = k.expect;
    for (char& ch : expect)
      if (ch == '|') ch = '/';
    md += "| " + k.input + " | " +
          (k.exit_code == 2 ? "exit 2: `… " + expect + " …`"
                            : "exit " + std::to_string(k.exit_code) + ", prints `" + expect + "`") +
          " | `" + k.name + "` |\n";
  }
  return md;
}

}  // namespace qtune::robustness
