// CLADA threshold controller: the core, header-only C++17, standard library only, no I/O.
//
// The same controller as clada_export/runtime/controller.py (the Python runtime's),
// decision for decision: sequence level (prefix scale from the prompt's activation
// statistics) and token level (percentile ranks of surprisal and entropy in a recent
// window -> normal / denser / sparser with hysteresis -> target byte sparsity with a
// budget -> per-layer thresholds). docs/controller.md describes the algorithm,
// docs/design.md where it sits in the threshold hierarchy.
//
// Exactness: every formula below mirrors the Python one operation by operation, in
// double precision, with sums in layer order. Compile without floating-point
// contraction (-ffp-contract=off; the CMake target clada::controller adds it) and
// without -ffast-math, or the last bits may differ from the Python side. The replay
// tests (runtime/tests, tests/test_controller.py) hold the two implementations together.
//
// This header reads and writes nothing, so an engine runner can embed it as is.
// Reading a profile from JSON: clada/profile_reader.hpp; trace records, the trace
// writer and replay: clada/trace.hpp (both need nlohmann/json).
//
// Contents:
//   clada::Profile            the parts of a clada sparsity profile the controller needs
//   clada::ControllerConfig   parameters; defaults checked against Python's by tests/test_controller.py
//   clada::StepRecord         one decision (one sequence, one step)
//   clada::ThresholdController
//
// Layouts: thresholds and act_stats are row-major [L, B, 2] (index (l * B + b) * 2 + k,
// k = 0 for the MLP input |x|, 1 for the intermediate |h|); profile tables [L, S].
#ifndef CLADA_CONTROLLER_HPP
#define CLADA_CONTROLLER_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__FAST_MATH__)
#warning "clada/controller.hpp: -ffast-math breaks NaN handling and bit-exact agreement with the Python controller"
#endif

namespace clada {

// ========================================================================= profile
// The controller's view of a clada sparsity profile (clada_export/profile.py).
struct Profile {
  std::string fingerprint;
  int num_layers = 0;
  int num_levels = 0;
  std::vector<double> levels;          // [S], strictly increasing
  std::vector<double> t_in, t_mid;     // [L, S]
  std::vector<double> calib_mean_abs;  // [L, 2]
  std::vector<double> s_in, s_mid;     // [L]
  double target_sparsity = 0.0;
  // The MLP's form, which weighs s_in against s_mid in byte sparsity (profile.byte_sparsity):
  // the gated MLP's input skips two matrices, the plain MLP's one.
  bool gated_mlp = true;
  double input_weight() const { return gated_mlp ? 2.0 : 1.0; }

  void validate() const {
    const std::size_t L = static_cast<std::size_t>(num_layers), S = levels.size();
    if (num_layers < 1 || S < 2) throw std::runtime_error("profile needs >= 1 layer and >= 2 levels");
    if (static_cast<std::size_t>(num_levels) != S) throw std::runtime_error("profile num_levels != levels.size()");
    for (std::size_t k = 1; k < S; ++k)
      if (!(levels[k] > levels[k - 1])) throw std::runtime_error("profile levels must be strictly increasing");
    if (t_in.size() != L * S || t_mid.size() != L * S || calib_mean_abs.size() != L * 2 || s_in.size() != L ||
        s_mid.size() != L)
      throw std::runtime_error("profile arrays have the wrong sizes for its layers and levels");
  }

  // The one C++ table interpolation: row l of table [L, S] at x, with numpy.interp's
  // arithmetic (and clada_export.profile.interp_rows'): at or beyond an end the end
  // value, exactly on a level that entry, else slope * (x - levels[j]) + table[j].
  // tests/data/interp_golden.json pins the results on both sides.
  double interp(const std::vector<double>& table, int l, double x) const {
    const int S = num_levels;
    const double* f = table.data() + static_cast<std::size_t>(l) * S;
    if (x >= levels[S - 1]) return f[S - 1];
    if (x <= levels[0]) return f[0];
    // j = largest index with levels[j] <= x (searchsorted right - 1); here 0 <= j <= S-2
    int j = static_cast<int>(std::upper_bound(levels.begin(), levels.end(), x) - levels.begin()) - 1;
    if (j > S - 2) j = S - 2;
    if (j < 0) j = 0;
    const double lj = levels[j];
    if (x == lj) return f[j];
    const double slope = (f[j + 1] - f[j]) / (levels[j + 1] - lj);
    return slope * (x - lj) + f[j];
  }
};

// ================================================================== configuration
// Same fields, defaults and meaning as clada_export.runtime.controller.ControllerConfig
// (the table in docs/controller.md is generated from the Python side; the test
// tests/test_controller.py::test_cpp_defaults_equal_python's fails if they part).
struct ControllerConfig {
  int window = 16;
  int min_history = 16;
  double high = 0.95;
  double high_margin = 0.1;
  double low = 0.4;
  int easy_steps = 2;
  double low_margin = 0.2;
  double dense_offset = 0.10;
  double sparse_offset = 0.05;
  std::optional<double> min_sparsity;
  std::optional<double> max_sparsity;
  int payback_steps = 16;
  double max_correction = 0.15;
  std::optional<double> target;
  double scale_min = 0.5;
  double scale_max = 2.0;
  double prefix_strength = 1.0;
  bool trace_thresholds = false;

  // The one list of fields, in Python's order: f(name, member) for each. Readers and
  // writers (clada/trace.hpp) iterate it, so a new field is added here only.
  template <class Config, class F>
  static void for_each_field(Config& c, F&& f) {
    f("window", c.window);
    f("min_history", c.min_history);
    f("high", c.high);
    f("high_margin", c.high_margin);
    f("low", c.low);
    f("easy_steps", c.easy_steps);
    f("low_margin", c.low_margin);
    f("dense_offset", c.dense_offset);
    f("sparse_offset", c.sparse_offset);
    f("min_sparsity", c.min_sparsity);
    f("max_sparsity", c.max_sparsity);
    f("payback_steps", c.payback_steps);
    f("max_correction", c.max_correction);
    f("target", c.target);
    f("scale_min", c.scale_min);
    f("scale_max", c.scale_max);
    f("prefix_strength", c.prefix_strength);
    f("trace_thresholds", c.trace_thresholds);
  }

  void validate() const {
    auto bad = [](const std::string& m) { throw std::invalid_argument("controller config: " + m); };
    if (window < 1) bad("window must be a positive integer");
    if (min_history < 1 || min_history > window) bad("min_history must be in [1, window]");
    if (easy_steps < 1) bad("easy_steps must be a positive integer");
    if (payback_steps < 1) bad("payback_steps must be a positive integer");
    if (!(0.0 <= low && low < high && high <= 1.0)) bad("need 0 <= low < high <= 1");
    for (double v : {high_margin, low_margin, dense_offset, sparse_offset, max_correction, prefix_strength})
      if (!(std::isfinite(v) && v >= 0.0)) bad("margins, offsets, max_correction, prefix_strength must be >= 0");
    if (!(0.0 < scale_min && scale_min <= 1.0 && 1.0 <= scale_max)) bad("need 0 < scale_min <= 1 <= scale_max");
  }
};

enum class State : int { Normal = 0, Denser = 1, Sparser = 2 };

inline const char* state_name(State s) {
  switch (s) {
    case State::Denser: return "denser";
    case State::Sparser: return "sparser";
    default: return "normal";
  }
}

// One decision: the thresholds chosen for (the decode step after) step `step` of
// sequence `seq`. Python's counterpart is clada_export.runtime.controller.Decision.
struct StepRecord {
  long long step = 0;
  int seq = 0;
  bool has_token = false;
  long long token = 0;
  double surprisal = 0.0, entropy = 0.0;
  bool has_load = false;  // false during warm-up
  double load = 0.0;      // percentile-rank load in [0, 1]
  State state = State::Normal;
  double target = 0.0;    // chosen target byte sparsity
  double realized = 0.0;  // mean over layers of byte sparsity of the clipped levels
  double debt = 0.0;      // budget debt after this step
  double t_in_mean = 0.0, t_mid_mean = 0.0;
  std::vector<float> thresholds;  // [L, 2], only with config.trace_thresholds
};

// =================================================================== controller
class ThresholdController {
 public:
  static constexpr double kDefaultBelow = 0.20;  // min_sparsity = max(levels[0], target - 0.20)
  static constexpr double kDefaultAbove = 0.15;  // max_sparsity = min(levels[-1], target + 0.15)

  ThresholdController(Profile profile, ControllerConfig config, int batch)
      : p_(std::move(profile)), c_(config), B_(batch) {
    p_.validate();
    c_.validate();
    if (B_ < 1) throw std::invalid_argument("controller batch must be >= 1");
    L_ = p_.num_layers;
    lo_ = p_.levels.front();
    hi_ = p_.levels.back();
    std::vector<double> ci, cm;
    const double alloc = levels_at(0.0, ci, cm);
    target_ = c_.target ? *c_.target : alloc;
    min_s_ = c_.min_sparsity ? *c_.min_sparsity : std::max(lo_, target_ - kDefaultBelow);
    max_s_ = c_.max_sparsity ? *c_.max_sparsity : std::min(hi_, target_ + kDefaultAbove);
    if (!(lo_ <= target_ && target_ <= hi_)) throw std::invalid_argument("controller target outside profile levels");
    if (!(min_s_ <= target_ && target_ <= max_s_))
      throw std::invalid_argument("controller bounds do not contain the target");
    high_exit_ = c_.high - c_.high_margin;
    low_exit_ = c_.low + c_.low_margin;
    reset(nullptr);
  }

  int num_layers() const { return L_; }
  int batch() const { return B_; }
  double target() const { return target_; }
  double min_sparsity() const { return min_s_; }
  double max_sparsity() const { return max_s_; }
  const ControllerConfig& config() const { return c_; }
  const Profile& profile() const { return p_; }
  std::size_t out_size() const { return static_cast<std::size_t>(L_) * B_ * 2; }

  // Start a generation. act_stats: [L, B, 2] mean |x|, mean |h| over each prompt's
  // valid tokens, or nullptr (no prefix shift). out: [L, B, 2] thresholds at the
  // target with the prefix scale (not counted in the budget). Resets all state.
  void begin(const double* act_stats, float* out) {
    reset(act_stats);
    begun_ = true;
    std::copy(last_.begin(), last_.end(), out);
  }
  std::vector<float> begin(const std::vector<double>* act_stats = nullptr) {
    if (act_stats && act_stats->size() != out_size()) throw std::invalid_argument("act_stats must be [L, B, 2]");
    std::vector<float> out(out_size());
    begin(act_stats ? act_stats->data() : nullptr, out.data());
    return out;
  }
  // True once begin() (or a first step(), which begins without a prefix shift) ran.
  bool begun() const { return begun_; }

  // One decode step's signals -> the next decode step's thresholds.
  // surprisal, entropy: [B] nats; tokens: [B] or nullptr (recorded only);
  // active: [B] (nonzero = generating) or nullptr (all). out: [L, B, 2].
  void step(const double* surprisal, const double* entropy, const std::int64_t* tokens,
            const std::uint8_t* active, float* out) {
    if (!begun_) {
      reset(nullptr);
      begun_ = true;
    }
    for (int b = 0; b < B_; ++b) {
      if (active && !active[b]) continue;
      step_one(b, surprisal[b], entropy[b], tokens != nullptr, tokens ? tokens[b] : 0);
    }
    ++step_index_;
    std::copy(last_.begin(), last_.end(), out);
  }
  std::vector<float> step(const std::vector<double>& surprisal, const std::vector<double>& entropy,
                          const std::vector<std::int64_t>* tokens = nullptr,
                          const std::vector<std::uint8_t>* active = nullptr) {
    const std::size_t B = static_cast<std::size_t>(B_);
    if (surprisal.size() != B || entropy.size() != B || (tokens && tokens->size() != B) ||
        (active && active->size() != B))
      throw std::invalid_argument("step inputs must have batch size entries");
    std::vector<float> out(out_size());
    step(surprisal.data(), entropy.data(), tokens ? tokens->data() : nullptr, active ? active->data() : nullptr,
         out.data());
    return out;
  }

  // The allocation's thresholds, no prefix shift, no token control: [L, batch, 2].
  std::vector<float> static_thresholds(int batch = -1) const {
    const int B = batch < 0 ? B_ : batch;
    std::vector<double> ci, cm;
    levels_at(0.0, ci, cm);
    std::vector<float> out(static_cast<std::size_t>(L_) * B * 2);
    for (int l = 0; l < L_; ++l) {
      const float a = static_cast<float>(p_.interp(p_.t_in, l, ci[l]));
      const float m = static_cast<float>(p_.interp(p_.t_mid, l, cm[l]));
      for (int b = 0; b < B; ++b) {
        out[(static_cast<std::size_t>(l) * B + b) * 2] = a;
        out[(static_cast<std::size_t>(l) * B + b) * 2 + 1] = m;
      }
    }
    return out;
  }

  double mean_sparsity(int b) const {
    return n_steps_[b] > 0 ? sum_realized_[b] / static_cast<double>(n_steps_[b])
                           : std::numeric_limits<double>::quiet_NaN();
  }
  long long steps(int b) const { return n_steps_[b]; }
  long long denser_steps(int b) const { return n_denser_[b]; }
  long long sparser_steps(int b) const { return n_sparser_[b]; }
  State state(int b) const { return state_[b]; }
  double scale(int l, int b, int k) const { return scale_[(static_cast<std::size_t>(l) * B_ + b) * 2 + k]; }
  // The decision last made for sequence b (valid after its first active step).
  const StepRecord& last_record(int b) const { return last_rec_[b]; }
  long long step_index() const { return step_index_; }

 private:
  // Allocation shifted by `shift`, clipped to the table's levels; returns the realized
  // byte sparsity (mean over layers of (w * s_in + s_mid) / (w + 1), w = 2 gated and 1
  // plain, summed in layer order).
  double levels_at(double shift, std::vector<double>& ci, std::vector<double>& cm) const {
    ci.resize(L_);
    cm.resize(L_);
    const double w = p_.input_weight();
    double acc = 0.0;
    for (int l = 0; l < L_; ++l) {
      ci[l] = std::min(std::max(p_.s_in[l] + shift, lo_), hi_);
      cm[l] = std::min(std::max(p_.s_mid[l] + shift, lo_), hi_);
      acc += (w * ci[l] + cm[l]) / (w + 1.0);
    }
    return acc / static_cast<double>(L_);
  }

  double scale_of(double prompt_mean, double calib_mean) const {
    if (!(std::isfinite(prompt_mean) && std::isfinite(calib_mean)) || prompt_mean < 0.0 || calib_mean <= 0.0)
      return 1.0;
    const double ratio = prompt_mean / calib_mean;
    const double s = 1.0 + c_.prefix_strength * (ratio - 1.0);
    return std::min(std::max(s, c_.scale_min), c_.scale_max);
  }

  static double rank(double v, const std::deque<double>& hist) {
    if (std::isnan(v)) return 0.5;
    long long less = 0, eq = 0;
    for (double h : hist) {
      if (h < v) ++less;
      else if (h == v) ++eq;
    }
    return (static_cast<double>(less) + 0.5 * static_cast<double>(eq)) / static_cast<double>(hist.size());
  }

  void reset(const double* act_stats) {
    const std::size_t n = out_size();
    scale_.assign(n, 1.0);
    if (act_stats) {
      for (int l = 0; l < L_; ++l)
        for (int b = 0; b < B_; ++b)
          for (int k = 0; k < 2; ++k) {
            const std::size_t i = (static_cast<std::size_t>(l) * B_ + b) * 2 + k;
            scale_[i] = scale_of(act_stats[i], p_.calib_mean_abs[static_cast<std::size_t>(l) * 2 + k]);
          }
    }
    hist_u_.assign(B_, {});
    hist_e_.assign(B_, {});
    state_.assign(B_, State::Normal);
    easy_run_.assign(B_, 0);
    debt_.assign(B_, 0.0);
    sum_realized_.assign(B_, 0.0);
    n_steps_.assign(B_, 0);
    n_denser_.assign(B_, 0);
    n_sparser_.assign(B_, 0);
    last_rec_.assign(B_, StepRecord{});
    step_index_ = 0;
    std::vector<double> ci, cm;
    levels_at(0.0, ci, cm);
    last_.assign(n, 0.0f);
    for (int l = 0; l < L_; ++l) {
      const double a = p_.interp(p_.t_in, l, ci[l]);
      const double m = p_.interp(p_.t_mid, l, cm[l]);
      for (int b = 0; b < B_; ++b) {
        const std::size_t i = (static_cast<std::size_t>(l) * B_ + b) * 2;
        last_[i] = static_cast<float>(a * scale_[i]);
        last_[i + 1] = static_cast<float>(m * scale_[i + 1]);
      }
    }
  }

  void step_one(int b, double u, double e, bool has_token, std::int64_t token) {
    std::deque<double>& hu = hist_u_[b];
    std::deque<double>& he = hist_e_[b];
    const std::size_t min_hist = static_cast<std::size_t>(c_.min_history);
    // 1. load
    bool has_load = false;
    double load = 0.0;
    if (hu.size() >= min_hist && he.size() >= min_hist) {
      has_load = true;
      load = std::max(rank(u, hu), rank(e, he));
    }
    if (!std::isnan(u)) {
      hu.push_back(u);
      if (hu.size() > static_cast<std::size_t>(c_.window)) hu.pop_front();
    }
    if (!std::isnan(e)) {
      he.push_back(e);
      if (he.size() > static_cast<std::size_t>(c_.window)) he.pop_front();
    }
    // 2. state machine with hysteresis
    if (has_load) {
      easy_run_[b] = load <= c_.low ? easy_run_[b] + 1 : 0;
      State st = state_[b];
      if (load >= c_.high) st = State::Denser;
      else if (st == State::Denser && load >= high_exit_) st = State::Denser;
      else if (easy_run_[b] >= c_.easy_steps) st = State::Sparser;
      else if (st == State::Sparser && load <= low_exit_) st = State::Sparser;
      else st = State::Normal;
      state_[b] = st;
    }
    const State st = state_[b];
    const double offset = st == State::Denser ? -c_.dense_offset : (st == State::Sparser ? c_.sparse_offset : 0.0);
    // 3. budget
    double corr = debt_[b] / static_cast<double>(c_.payback_steps);
    corr = std::min(std::max(corr, -c_.max_correction), c_.max_correction);
    double s_t = target_ + offset + corr;
    s_t = std::min(std::max(s_t, min_s_), max_s_);
    // 4. levels -> thresholds
    std::vector<double>& ci = tmp_ci_;
    std::vector<double>& cm = tmp_cm_;
    const double realized = levels_at(s_t - target_, ci, cm);
    double acc_in = 0.0, acc_mid = 0.0;
    for (int l = 0; l < L_; ++l) {
      const std::size_t i = (static_cast<std::size_t>(l) * B_ + b) * 2;
      const double ti = p_.interp(p_.t_in, l, ci[l]) * scale_[i];
      const double tm = p_.interp(p_.t_mid, l, cm[l]) * scale_[i + 1];
      last_[i] = static_cast<float>(ti);
      last_[i + 1] = static_cast<float>(tm);
      acc_in += ti;
      acc_mid += tm;
    }
    debt_[b] = debt_[b] + (target_ - realized);
    sum_realized_[b] += realized;
    n_steps_[b] += 1;
    if (st == State::Denser) n_denser_[b] += 1;
    if (st == State::Sparser) n_sparser_[b] += 1;

    StepRecord& r = last_rec_[b];
    r.step = step_index_;
    r.seq = b;
    r.has_token = has_token;
    r.token = token;
    r.surprisal = u;
    r.entropy = e;
    r.has_load = has_load;
    r.load = load;
    r.state = st;
    r.target = s_t;
    r.realized = realized;
    r.debt = debt_[b];
    r.t_in_mean = acc_in / static_cast<double>(L_);
    r.t_mid_mean = acc_mid / static_cast<double>(L_);
    r.thresholds.clear();
    if (c_.trace_thresholds) {
      for (int l = 0; l < L_; ++l) {
        const std::size_t i = (static_cast<std::size_t>(l) * B_ + b) * 2;
        r.thresholds.push_back(last_[i]);
        r.thresholds.push_back(last_[i + 1]);
      }
    }
  }

  Profile p_;
  ControllerConfig c_;
  int B_ = 1;
  int L_ = 0;
  double lo_ = 0.0, hi_ = 0.0, target_ = 0.0, min_s_ = 0.0, max_s_ = 0.0, high_exit_ = 0.0, low_exit_ = 0.0;
  bool begun_ = false;
  long long step_index_ = 0;
  std::vector<double> scale_;  // [L, B, 2]
  std::vector<float> last_;    // [L, B, 2]
  std::vector<std::deque<double>> hist_u_, hist_e_;
  std::vector<State> state_;
  std::vector<int> easy_run_;
  std::vector<double> debt_, sum_realized_;
  std::vector<long long> n_steps_, n_denser_, n_sparser_;
  std::vector<StepRecord> last_rec_;
  std::vector<double> tmp_ci_, tmp_cm_;
};

}  // namespace clada

#endif  // CLADA_CONTROLLER_HPP
