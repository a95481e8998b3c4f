// clada_run's loop (clada_run.cpp, generate()) against a stand-in for the engine session, on a
// CUDA GPU: not a substitute for TensorRT (no engine runs), a check of the loop's own logic.
//
//   clada_run_loop_test PROFILE_DIR     (a directory with a 6-layer profile.json: tests/data/controller)
//
// The stand-in keeps TensorRT's rules (every tensor bound and every input shaped before
// enqueue, shapes inside the profile, past_* and present_* never the same buffer) and checks:
//   - ping-pong: each step's past_* is the buffer the previous step wrote as present_*, and
//     holds what was written there (every present_* is filled with the step's number);
//   - tokens and positions: the ids fed back are the ones picked from the logits it wrote,
//     each position is the prompt length plus the steps so far;
//   - thresholds: prefill reads zeros; each decode reads exactly what a second controller,
//     fed the same signals (surprisal = logsumexp - picked logit, entropy), returns.
// It writes logits whose argmax is a known function of the last token, and signals that
// vary with the step so the controller changes state. Exit code 0 only if all checks pass.
#define CLADA_RUN_NO_MAIN
#include "clada_run.cpp"  // NOLINT: the loop is tested in its own translation unit

#include <cstring>
#include <map>

namespace {

constexpr int kLayers = 6;
constexpr int64_t kKv = 1, kHd = 4, kVocab = 32;
int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

int64_t next_token(int64_t last, int64_t b) { return (last * 7 + 3 + b) % kVocab; }
// every 10th step a surprisal above all before it: the controller's load reaches 1 (denser)
float lse_at(int step, int64_t b) {
  return step % 10 == 9 ? 8.0f + 0.1f * static_cast<float>(step) : 5.5f + 0.1f * static_cast<float>((step * 5 + b) % 7);
}
float entropy_at(int step, int64_t b) { return 1.0f + 0.37f * static_cast<float>((step * 3 + b) % 5); }

struct Log {  // what the stand-ins saw and wrote, across both engines
  int executions = 0;
  std::vector<void*> last_present;       // [2L] addresses written by the previous execution
  std::set<void*> cache_buffers;
  std::vector<std::vector<float>> thresholds;  // per execution
  std::vector<std::vector<int64_t>> tokens_in;  // decode executions: the ids fed
  std::vector<std::vector<double>> surprisal, entropy;  // per execution, as the loop computes them
  std::vector<int64_t> lens;
};

template <class T>
std::vector<T> read(void* ptr, std::size_t n) {
  std::vector<T> v(n);
  clada::cuda_check(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "read");
  return v;
}

template <class T>
void write(void* ptr, const std::vector<T>& v) {
  clada::cuda_check(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "write");
}

class FakeSession {
 public:
  FakeSession(bool prefill, Log& log) : prefill_(prefill), log_(log) {
    inputs_ = {"input_ids", prefill ? "seq_lens" : "position", "thresholds"};
    outputs_ = {"logits", "entropy", "logsumexp"};
    if (prefill) outputs_.push_back("act_stats");
    for (int i = 0; i < kLayers; ++i) {
      inputs_.push_back(past_key(i));
      inputs_.push_back(past_value(i));
      outputs_.push_back(present_key(i));
      outputs_.push_back(present_value(i));
    }
  }
  std::string path() const { return prefill_ ? "fake prefill" : "fake decode"; }
  bool has(const std::string& n) const { return is_input(n) || is_output(n); }
  nvinfer1::DataType dtype(const std::string& n) const {
    return (n == "input_ids" || n == "seq_lens" || n == "position") ? nvinfer1::DataType::kINT64
                                                                     : nvinfer1::DataType::kFLOAT;
  }
  std::vector<int64_t> shape(const std::string& n) const {
    if (n == "logits") return {-1, kVocab};
    if (n.rfind("past_", 0) == 0 || n.rfind("present_", 0) == 0) return {-1, kKv, -1, kHd};
    if (n == "thresholds" || n == "act_stats") return {kLayers, -1, 2};
    if (n == "input_ids") return {-1, prefill_ ? -1 : 1};
    return {-1};
  }
  std::vector<int64_t> profile(const std::string& n, nvinfer1::OptProfileSelector which) const {
    const bool mx = which == nvinfer1::OptProfileSelector::kMAX;
    if (n.rfind("past_", 0) == 0) return {mx ? 4 : 1, kKv, mx ? 64 : 8, kHd};
    if (n == "input_ids") return {mx ? 4 : 1, prefill_ ? (mx ? 32 : 1) : 1};
    throw std::runtime_error("no profile asked for " + n);
  }
  void set_input_shape(const std::string& n, const std::vector<int64_t>& s) {
    check(is_input(n), path() + ": shape set for non-input " + n);
    std::vector<int64_t> decl = shape(n);
    check(decl.size() == s.size(), path() + ": rank of " + n);
    for (std::size_t i = 0; i < s.size() && i < decl.size(); ++i)
      check(decl[i] < 0 || decl[i] == s[i], path() + ": static dim of " + n);
    if (n.rfind("past_", 0) == 0)
      check(s[0] >= 1 && s[0] <= 4 && s[2] >= 8 && s[2] <= 64, path() + ": " + n + " outside the profile");
    shapes_[n] = s;
  }
  std::vector<int64_t> output_shape(const std::string& n) const {
    const int64_t B = shapes_.at("input_ids")[0];
    if (n == "logits") return {B, kVocab};
    return {B};
  }
  void bind(const std::string& n, void* p) {
    check(has(n), path() + ": bound unknown tensor " + n);
    addr_[n] = p;
  }

  void enqueue(cudaStream_t stream) {
    clada::cuda_check(cudaStreamSynchronize(stream), "sync before the stand-in reads");
    for (const auto& n : inputs_) check(addr_.count(n) && shapes_.count(n), path() + ": input unbound: " + n);
    for (const auto& n : outputs_) check(addr_.count(n) > 0, path() + ": output unbound: " + n);
    const int64_t B = shapes_.at("input_ids")[0], T = shapes_.at("input_ids")[1];
    const int64_t S = shapes_.at(past_key(0))[2];
    const int step = log_.executions;
    const std::size_t cache_n = static_cast<std::size_t>(B * kKv * S * kHd);

    // ping-pong: read what the previous execution wrote, into the other set
    std::vector<void*> present;
    for (int i = 0; i < kLayers; ++i) {
      for (const auto& [past, pres] : {std::pair{past_key(i), present_key(i)}, {past_value(i), present_value(i)}}) {
        check(addr_[past] != addr_[pres], path() + ": " + past + " and " + pres + " alias");
        if (step > 0)
          check(addr_[past] == log_.last_present[present.size()], path() + ": " + past + " is not the last present");
        const auto values = read<float>(addr_[past], cache_n);
        check(std::all_of(values.begin(), values.end(), [&](float v) { return v == static_cast<float>(step); }),
              path() + ": " + past + " does not hold the previous step's cache");
        write(addr_[pres], std::vector<float>(cache_n, static_cast<float>(step + 1)));
        present.push_back(addr_[pres]);
        log_.cache_buffers.insert(addr_[past]);
        log_.cache_buffers.insert(addr_[pres]);
      }
    }
    log_.last_present = present;
    log_.thresholds.push_back(read<float>(addr_["thresholds"], static_cast<std::size_t>(kLayers * B * 2)));

    const auto ids = read<int64_t>(addr_["input_ids"], static_cast<std::size_t>(B * T));
    std::vector<int64_t> last(B);
    if (prefill_) {
      const auto lens = read<int64_t>(addr_["seq_lens"], static_cast<std::size_t>(B));
      for (int64_t b = 0; b < B; ++b) last[b] = ids[b * T + lens[b] - 1];
      log_.lens = lens;
      write(addr_["act_stats"], std::vector<float>(static_cast<std::size_t>(kLayers * B * 2), 0.25f));
    } else {
      const auto pos = read<int64_t>(addr_["position"], static_cast<std::size_t>(B));
      for (int64_t b = 0; b < B; ++b) {
        check(pos[b] == log_.lens[b] + step - 1, path() + ": position of sequence " + std::to_string(b));
        last[b] = ids[b];
      }
      log_.tokens_in.push_back(ids);
    }
    std::vector<float> logits(static_cast<std::size_t>(B * kVocab), 0.0f), lse(B), ent(B);
    std::vector<double> sur(B), entd(B);
    for (int64_t b = 0; b < B; ++b) {
      logits[b * kVocab + next_token(last[b], b)] = 5.0f;
      lse[b] = lse_at(step, b);
      ent[b] = entropy_at(step, b);
      sur[b] = static_cast<double>(lse[b]) - 5.0;
      entd[b] = ent[b];
    }
    write(addr_["logits"], logits);
    write(addr_["logsumexp"], lse);
    write(addr_["entropy"], ent);
    log_.surprisal.push_back(sur);
    log_.entropy.push_back(entd);
    ++log_.executions;
  }

 private:
  bool is_input(const std::string& n) const { return std::find(inputs_.begin(), inputs_.end(), n) != inputs_.end(); }
  bool is_output(const std::string& n) const {
    return std::find(outputs_.begin(), outputs_.end(), n) != outputs_.end();
  }
  bool prefill_;
  Log& log_;
  std::vector<std::string> inputs_, outputs_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::map<std::string, void*> addr_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: clada_run_loop_test PROFILE_DIR (with a 6-layer profile.json)\n";
    return 2;
  }
  try {
    Options opt;
    opt.export_dir = argv[1];
    opt.max_new_tokens = 48;  // past the controller's 16-step warm-up
    const std::vector<std::vector<int64_t>> prompts{{1, 2, 3, 4, 5}, {9, 8}};
    // sequence 0 stops at its 6th generated token: the loop must mark it inactive
    int64_t t = prompts[0].back();
    for (int k = 0; k < 6; ++k) t = next_token(t, 0);
    opt.eos.insert(t);

    Log log;
    FakeSession prefill(true, log), decode(false, log);
    std::ostringstream printed;
    const auto generated = generate(prefill, decode, prompts, opt, printed);

    // tokens: each sequence's chain, sequence 0 up to and including its EOS
    std::vector<std::vector<int64_t>> expected(2);
    std::vector<std::uint8_t> active{1, 1};
    std::vector<int64_t> last{prompts[0].back(), prompts[1].back()};
    for (int k = 0; k < opt.max_new_tokens; ++k)
      for (int64_t b = 0; b < 2; ++b) {
        last[b] = next_token(last[b], b);
        if (active[b]) expected[b].push_back(last[b]);
        if (opt.eos.count(last[b])) active[b] = 0;
      }
    check(generated == expected, "generated ids differ from the logits' argmax chain");
    check(expected[0].size() == 6 && expected[1].size() == 48, "test setup: EOS after 6 tokens for sequence 0");
    std::ostringstream want;
    for (const auto& g : expected) {
      for (std::size_t i = 0; i < g.size(); ++i) want << (i ? " " : "") << g[i];
      want << "\n";
    }
    check(printed.str() == want.str(), "printed ids differ:\n" + printed.str());
    check(log.executions == opt.max_new_tokens, "one prefill and max_new_tokens - 1 decode executions");
    check(log.cache_buffers.size() == 4u * kLayers, "exactly two cache sets of 2L buffers");

    // thresholds: zeros for prefill, then exactly the reference controller's choices
    const auto& t0 = log.thresholds.at(0);
    check(std::all_of(t0.begin(), t0.end(), [](float v) { return v == 0.0f; }), "prefill thresholds not zero");
    clada::ThresholdController ref(clada::load_profile(opt.export_dir + "/profile.json"), clada::ControllerConfig{}, 2);
    std::vector<float> thr(ref.out_size());
    const std::vector<double> stats(static_cast<std::size_t>(kLayers * 2 * 2), static_cast<double>(0.25f));
    ref.begin(stats.data(), thr.data());
    std::set<std::vector<float>> distinct;
    std::vector<std::uint8_t> act{1, 1};
    for (int k = 0; k + 1 < log.executions; ++k) {
      std::vector<int64_t> picked(2);
      for (int64_t b = 0; b < 2; ++b) {
        picked[b] = log.tokens_in.at(k)[b];
        if (opt.eos.count(picked[b])) act[b] = 0;  // a sequence that just ended takes no step
      }
      ref.step(log.surprisal[k].data(), log.entropy[k].data(), picked.data(), act.data(), thr.data());
      check(log.thresholds.at(k + 1) == thr, "decode step " + std::to_string(k) + ": thresholds differ");
      distinct.insert(thr);
    }
    check(distinct.size() > 1, "the controller never moved: the test's signals are too flat");
  } catch (const std::exception& e) {
    std::cerr << "FAIL: " << e.what() << "\n";
    return 1;
  }
  if (failures) return 1;
  std::cout << "clada_run loop: all checks passed\n";
  return 0;
}
