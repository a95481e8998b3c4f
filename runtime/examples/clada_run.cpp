// clada_run: greedy generation with a clada export's TensorRT engines and the threshold
// controller in the loop. The loop of the Python runtime (clada_export/runtime/generator.py)
// in one file, on engine_session.hpp.
//
//   clada_run OUT [--ids FILE] [--max-new-tokens N] [--eos ID]... [--plugin LIB] [--static | --dense]
//
// Token ids in: one prompt per line, ids separated by spaces (FILE, or stdin). Token ids
// out: one line per prompt, the generated ids (an EOS id included where reached). OUT is
// the directory of `clada-export export` + `clada-export build`: prefill.engine,
// decode.engine and, when exported with a profile, profile.json (the controller's tables;
// without one the model runs dense). Timing and sparsity go to stderr.
//
// Per step: the controller's thresholds [L, B, 2] and the new token ids go to the device,
// the engine runs with execute (enqueueV3) on one stream, and the logits come back for the
// greedy pick (B x vocab floats). The KV cache stays on the device: two sets, the step
// reads one (past_*) and writes the other (present_*), and the next step swaps them.
#include <clada/controller.hpp>
#include <clada/profile_reader.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <set>
#include <string>
#include <vector>

#include "engine_session.hpp"

namespace {

using clada::DeviceBuffer;
using clada::EngineSession;
using nvinfer1::OptProfileSelector;

struct Options {
  std::string export_dir, ids_file, plugin;
  int max_new_tokens = 64;
  std::set<int64_t> eos;
  bool dense = false, static_thresholds = false;
};

std::string past_key(int i) { return "past_key." + std::to_string(i); }
std::string past_value(int i) { return "past_value." + std::to_string(i); }
std::string present_key(int i) { return "present_key." + std::to_string(i); }
std::string present_value(int i) { return "present_value." + std::to_string(i); }

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

// The [lo, hi] range both engines accept for dimension `dim` of input `name`.
template <class Session>
std::pair<int64_t, int64_t> common_range(const Session& a, const Session& b, const std::string& name, int dim) {
  return {std::max(a.profile(name, OptProfileSelector::kMIN)[dim], b.profile(name, OptProfileSelector::kMIN)[dim]),
          std::min(a.profile(name, OptProfileSelector::kMAX)[dim], b.profile(name, OptProfileSelector::kMAX)[dim])};
}

// The loop, on two sessions with EngineSession's methods (engine_session.hpp); a template so
// that a stand-in can drive it in a test (test_loop.cpp). Prints one line of generated ids
// per prompt to `out` and returns them.
template <class Session>
std::vector<std::vector<int64_t>> generate(Session& prefill, Session& decode,
                                           const std::vector<std::vector<int64_t>>& prompts, const Options& opt,
                                           std::ostream& out) {
  // Model dimensions, read from the engines: layers from the cache inputs, [B, kv, slots, hd]
  int L = 0;
  while (decode.has(past_key(L))) ++L;
  if (L == 0) throw std::runtime_error(decode.path() + " has no past_key.0 input: not a clada decode engine");
  const std::vector<int64_t> cache_decl = decode.shape(past_key(0));
  const int64_t kv = cache_decl[1], hd = cache_decl[3], vocab = decode.shape("logits")[1];
  const std::size_t cache_elem = clada::element_size(decode.dtype(past_key(0)));

  const int64_t B = static_cast<int64_t>(prompts.size());
  int64_t T = 0;
  for (const auto& p : prompts) T = std::max<int64_t>(T, static_cast<int64_t>(p.size()));
  const auto batch_range = common_range(prefill, decode, past_key(0), 0);
  const auto slot_range = common_range(prefill, decode, past_key(0), 2);
  const int64_t needed = T + opt.max_new_tokens;
  const int64_t seq_max = prefill.profile("input_ids", OptProfileSelector::kMAX)[1];
  if (B < batch_range.first || B > batch_range.second || needed > slot_range.second || T > seq_max)
    throw std::invalid_argument("the engines take " + std::to_string(batch_range.second) + " prompts of up to " +
                                std::to_string(slot_range.second) + " tokens (prompt + generated); rebuild with "
                                "`clada-export build OUT --max-batch N --max-seq N --force`");
  const int64_t slots = std::max(needed, slot_range.first);  // slots past the last position are never read

  // The controller: dynamic (default) or static thresholds from the export's profile, else dense.
  const std::string profile_path = opt.export_dir + "/profile.json";
  std::unique_ptr<clada::ThresholdController> controller;
  if (!opt.dense && file_exists(profile_path))
    controller = std::make_unique<clada::ThresholdController>(clada::load_profile(profile_path),
                                                             clada::ControllerConfig{}, static_cast<int>(B));
  else if (!opt.dense)
    std::cerr << "note: " << profile_path << " not found, so the model runs dense; export with --profile\n";
  const std::size_t n_thr = static_cast<std::size_t>(L) * B * 2;
  std::vector<float> thresholds(n_thr, 0.0f);

  // Device buffers: everything the engines read or write, allocated once.
  cudaStream_t stream;
  clada::cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
  const std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> stream_owner(stream, cudaStreamDestroy);
  DeviceBuffer d_ids(B * T * 8), d_lens(B * 8), d_thr(n_thr * 4), d_tok(B * 8), d_pos(B * 8);
  DeviceBuffer d_logits(B * vocab * 4), d_entropy(B * 4), d_lse(B * 4), d_stats(n_thr * 4);
  std::vector<DeviceBuffer> caches[2];
  for (auto& set : caches)
    for (int i = 0; i < 2 * L; ++i) set.emplace_back(static_cast<std::size_t>(B * kv * slots * hd) * cache_elem);
  const std::vector<int64_t> cache_shape{B, kv, slots, hd};

  auto bind_common = [&](Session& s) {
    s.set_input_shape("thresholds", {L, B, 2});
    s.bind("thresholds", d_thr.get());
    for (int i = 0; i < L; ++i) {
      s.set_input_shape(past_key(i), cache_shape);
      s.set_input_shape(past_value(i), cache_shape);
    }
    s.bind("logits", d_logits.get());
    s.bind("entropy", d_entropy.get());
    s.bind("logsumexp", d_lse.get());
    if (s.output_shape("logits") != std::vector<int64_t>{B, vocab})
      throw std::runtime_error(s.path() + ": unexpected logits shape");
  };
  int parity = 0;  // caches[parity] is read, caches[1 - parity] written
  auto run_step = [&](Session& s) {
    for (int i = 0; i < L; ++i) {
      s.bind(past_key(i), caches[parity][2 * i].get());
      s.bind(past_value(i), caches[parity][2 * i + 1].get());
      s.bind(present_key(i), caches[1 - parity][2 * i].get());
      s.bind(present_value(i), caches[1 - parity][2 * i + 1].get());
    }
    s.enqueue(stream);
    parity ^= 1;
  };

  // Prefill (dense: its activation statistics are the prompt's own).
  std::vector<int64_t> ids(B * T, 0), lens(B), position(B);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(prompts[b].begin(), prompts[b].end(), ids.begin() + b * T);
    lens[b] = position[b] = static_cast<int64_t>(prompts[b].size());
  }
  const auto t0 = std::chrono::steady_clock::now();
  clada::cuda_check(cudaMemcpyAsync(d_ids.get(), ids.data(), ids.size() * 8, cudaMemcpyHostToDevice, stream), "ids");
  clada::cuda_check(cudaMemcpyAsync(d_lens.get(), lens.data(), B * 8, cudaMemcpyHostToDevice, stream), "seq_lens");
  clada::cuda_check(cudaMemsetAsync(d_thr.get(), 0, n_thr * 4, stream), "thresholds");
  prefill.set_input_shape("input_ids", {B, T});
  prefill.set_input_shape("seq_lens", {B});
  prefill.bind("input_ids", d_ids.get());
  prefill.bind("seq_lens", d_lens.get());
  prefill.bind("act_stats", d_stats.get());
  bind_common(prefill);
  run_step(prefill);

  decode.set_input_shape("input_ids", {B, 1});
  decode.set_input_shape("position", {B});
  decode.bind("input_ids", d_tok.get());
  decode.bind("position", d_pos.get());
  bind_common(decode);

  std::vector<float> logits(B * vocab), entropy_f(B), lse_f(B), stats_f(n_thr);
  std::vector<double> surprisal(B), entropy(B);
  std::vector<int64_t> picked(B);
  std::vector<std::uint8_t> active(B, 1);
  std::vector<std::vector<int64_t>> generated(B);
  double prefill_s = 0.0;
  auto t1 = t0;
  int decode_steps = 0;
  for (int step = 0; step < opt.max_new_tokens; ++step) {
    clada::cuda_check(cudaMemcpyAsync(logits.data(), d_logits.get(), logits.size() * 4, cudaMemcpyDeviceToHost,
                                      stream), "logits");
    clada::cuda_check(cudaMemcpyAsync(entropy_f.data(), d_entropy.get(), B * 4, cudaMemcpyDeviceToHost, stream),
                      "entropy");
    clada::cuda_check(cudaMemcpyAsync(lse_f.data(), d_lse.get(), B * 4, cudaMemcpyDeviceToHost, stream), "lse");
    if (step == 0)
      clada::cuda_check(cudaMemcpyAsync(stats_f.data(), d_stats.get(), n_thr * 4, cudaMemcpyDeviceToHost, stream),
                        "act_stats");
    clada::cuda_check(cudaStreamSynchronize(stream), "step");
    if (step == 0) {
      prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      t1 = std::chrono::steady_clock::now();
      if (controller) {
        const std::vector<double> stats(stats_f.begin(), stats_f.end());
        controller->begin(stats.data(), thresholds.data());
      }
    }
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      const float* row = logits.data() + b * vocab;
      picked[b] = std::max_element(row, row + vocab) - row;  // greedy: first maximum, as torch.argmax
      surprisal[b] = static_cast<double>(lse_f[b]) - static_cast<double>(row[picked[b]]);
      entropy[b] = entropy_f[b];
      if (active[b]) {
        generated[b].push_back(picked[b]);
        if (opt.eos.count(picked[b])) active[b] = 0;
      }
      all_done = all_done && !active[b];
    }
    if (all_done || step == opt.max_new_tokens - 1) break;
    if (controller && opt.static_thresholds) {
      if (step == 0) thresholds = controller->static_thresholds();
    } else if (controller) {
      controller->step(surprisal.data(), entropy.data(), picked.data(), active.data(), thresholds.data());
    }
    clada::cuda_check(cudaMemcpyAsync(d_thr.get(), thresholds.data(), n_thr * 4, cudaMemcpyHostToDevice, stream),
                      "thresholds");
    clada::cuda_check(cudaMemcpyAsync(d_tok.get(), picked.data(), B * 8, cudaMemcpyHostToDevice, stream), "tokens");
    clada::cuda_check(cudaMemcpyAsync(d_pos.get(), position.data(), B * 8, cudaMemcpyHostToDevice, stream),
                      "position");
    run_step(decode);
    for (auto& p : position) ++p;
    ++decode_steps;
  }
  clada::cuda_check(cudaStreamSynchronize(stream), "decode");
  const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

  for (const auto& g : generated) {
    for (std::size_t i = 0; i < g.size(); ++i) out << (i ? " " : "") << g[i];
    out << "\n";
  }
  std::cerr << "prefill " << prefill_s * 1e3 << " ms, decode " << (decode_s > 0 ? decode_steps * B / decode_s : 0.0)
            << " tokens/s";
  if (controller && !opt.static_thresholds) {
    double mean = 0.0;
    long long denser = 0, steps = 0;
    for (int b = 0; b < B; ++b) {
      mean += controller->mean_sparsity(b) / static_cast<double>(B);
      denser += controller->denser_steps(b);
      steps += controller->steps(b);
    }
    std::cerr << ", mean MLP sparsity " << mean << ", denser on " << denser << " of " << steps << " steps";
  }
  std::cerr << "\n";
  return generated;
}

}  // namespace

#ifndef CLADA_RUN_NO_MAIN
namespace {

const char* kUsage =
    "usage: clada_run OUT [--ids FILE] [--max-new-tokens N] [--eos ID]... [--plugin LIB] [--static | --dense]";

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> a(argv + 1, argv + argc);
  auto value = [&](std::size_t& i) -> const std::string& {
    if (i + 1 >= a.size()) throw std::invalid_argument(a[i] + " needs a value; " + kUsage);
    return a[++i];
  };
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--ids") o.ids_file = value(i);
    else if (a[i] == "--max-new-tokens") o.max_new_tokens = std::stoi(value(i));
    else if (a[i] == "--eos") o.eos.insert(std::stoll(value(i)));
    else if (a[i] == "--plugin") o.plugin = value(i);
    else if (a[i] == "--dense") o.dense = true;
    else if (a[i] == "--static") o.static_thresholds = true;
    else if (a[i] == "-h" || a[i] == "--help") { std::cout << kUsage << "\n"; std::exit(0); }
    else if (!a[i].empty() && a[i][0] == '-') throw std::invalid_argument("unknown option " + a[i] + "; " + kUsage);
    else if (o.export_dir.empty()) o.export_dir = a[i];
    else throw std::invalid_argument("one export directory only; " + std::string(kUsage));
  }
  if (o.export_dir.empty()) throw std::invalid_argument(kUsage);
  if (o.max_new_tokens < 1) throw std::invalid_argument("--max-new-tokens must be >= 1");
  if (o.plugin.empty() && std::getenv("CLADA_TRT_PLUGIN")) o.plugin = std::getenv("CLADA_TRT_PLUGIN");
  return o;
}

std::vector<std::vector<int64_t>> read_prompts(std::istream& in) {
  std::vector<std::vector<int64_t>> prompts;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ids(line);
    std::vector<int64_t> p;
    for (std::string tok; ids >> tok;) {
      std::size_t used = 0;
      p.push_back(std::stoll(tok, &used));
      if (used != tok.size()) throw std::invalid_argument("not a token id: " + tok);
    }
    if (!p.empty()) prompts.push_back(std::move(p));
  }
  if (prompts.empty()) throw std::invalid_argument("no prompt: give token ids, one prompt per line");
  return prompts;
}

int run(const Options& opt) {
  std::vector<std::vector<int64_t>> prompts;
  if (opt.ids_file.empty()) {
    prompts = read_prompts(std::cin);
  } else {
    std::ifstream f(opt.ids_file);
    if (!f) throw std::invalid_argument("cannot open " + opt.ids_file);
    prompts = read_prompts(f);
  }
  clada::StderrLogger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) throw std::runtime_error("could not create the TensorRT runtime");
  if (!opt.plugin.empty()) clada::load_plugin_library(*runtime, opt.plugin);
  EngineSession prefill(*runtime, opt.export_dir + "/prefill.engine");
  EngineSession decode(*runtime, opt.export_dir + "/decode.engine");
  generate(prefill, decode, prompts, opt, std::cout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::invalid_argument& e) {
    std::cerr << "clada_run: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "clada_run: error: " << e.what() << "\n";
    return 1;
  }
}
#endif  // CLADA_RUN_NO_MAIN
