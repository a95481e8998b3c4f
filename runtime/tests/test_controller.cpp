// Unit tests of the core controller (no framework: CHECK macros, exit status). Only
// clada/controller.hpp: the core builds without any JSON library.
#include <clada/controller.hpp>

#include "check.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

namespace {

using clada::ControllerConfig;
using clada::Profile;
using clada::State;
using clada::ThresholdController;

// 4 layers, levels 0, 0.05, ..., 0.95; monotone tables; an allocation around 0.5
// with one layer near each end so that shifts clip.
Profile tiny_profile() {
  Profile p;
  p.fingerprint = "tiny";
  p.num_layers = 4;
  p.num_levels = 20;
  for (int k = 0; k < 20; ++k) p.levels.push_back(k / 20.0);
  for (int l = 0; l < 4; ++l) {
    for (int k = 0; k < 20; ++k) {
      const double x = k / 20.0;
      p.t_in.push_back((0.5 + 0.25 * l) * (x + x * x));  // increasing in k
      p.t_mid.push_back((0.1 + 0.05 * l) * (2.0 * x + x * x * x));
    }
    p.calib_mean_abs.push_back(1.0 + l);
    p.calib_mean_abs.push_back(0.2 + 0.1 * l);
  }
  p.s_in = {0.5, 0.05, 0.9, 0.55};
  p.s_mid = {0.5, 0.6, 0.3, 0.92};
  p.target_sparsity = 0.5;
  p.validate();
  return p;
}

double mean_t_in(const std::vector<float>& thr, int L, int B, int b) {
  double acc = 0.0;
  for (int l = 0; l < L; ++l) acc += thr[(static_cast<std::size_t>(l) * B + b) * 2];
  return acc / L;
}

// Drive one sequence through `n` steps of signals from gen(t) -> (surprisal, entropy).
struct Run {
  std::vector<State> states;
  std::vector<double> targets;
  std::vector<double> realized;
  std::vector<double> t_in_means;
};

Run drive(ThresholdController& ctl, int n, const std::function<std::pair<double, double>(int)>& gen) {
  Run r;
  ctl.begin(nullptr);
  for (int t = 0; t < n; ++t) {
    auto ue = gen(t);
    std::vector<float> thr = ctl.step({ue.first}, {ue.second});
    const auto& rec = ctl.last_record(0);
    r.states.push_back(rec.state);
    r.targets.push_back(rec.target);
    r.realized.push_back(rec.realized);
    r.t_in_means.push_back(mean_t_in(thr, ctl.num_layers(), 1, 0));
  }
  return r;
}

void test_interp() {
  Profile p = tiny_profile();
  // on a level: the table entry; below/above: the ends; between: linear
  CHECK(p.interp(p.t_in, 1, p.levels[7]) == p.t_in[1 * 20 + 7]);
  CHECK(p.interp(p.t_in, 1, -1.0) == p.t_in[1 * 20 + 0]);
  CHECK(p.interp(p.t_in, 1, 2.0) == p.t_in[1 * 20 + 19]);
  CHECK(p.interp(p.t_in, 1, 0.95) == p.t_in[1 * 20 + 19]);
  const double x = 0.5 * (p.levels[3] + p.levels[4]);
  CHECK_NEAR(p.interp(p.t_in, 2, x), 0.5 * (p.t_in[2 * 20 + 3] + p.t_in[2 * 20 + 4]), 1e-12);
  // monotone
  double prev = -1.0;
  for (int i = 0; i <= 200; ++i) {
    const double v = p.interp(p.t_mid, 3, i / 200.0);
    CHECK(v >= prev);
    prev = v;
  }
}

void test_static_and_target() {
  Profile p = tiny_profile();
  ThresholdController ctl(p, ControllerConfig{}, 2);
  // target = mean byte sparsity of the clipped allocation
  double acc = 0.0;
  for (int l = 0; l < 4; ++l) acc += (2.0 * p.s_in[l] + p.s_mid[l]) / 3.0;
  CHECK(ctl.target() == acc / 4.0);
  CHECK_NEAR(ctl.min_sparsity(), ctl.target() - 0.2, 1e-15);
  CHECK_NEAR(ctl.max_sparsity(), ctl.target() + 0.15, 1e-15);
  std::vector<float> st = ctl.static_thresholds();
  std::vector<float> b0 = ctl.begin(nullptr);
  CHECK(st == b0);
  for (int l = 0; l < 4; ++l) {
    CHECK(st[(l * 2 + 1) * 2] == static_cast<float>(p.interp(p.t_in, l, p.s_in[l])));
    CHECK(st[(l * 2 + 1) * 2 + 1] == static_cast<float>(p.interp(p.t_mid, l, p.s_mid[l])));
  }
}

void test_spike_makes_denser() {
  Profile p = tiny_profile();
  ThresholdController ctl(p, ControllerConfig{}, 1);
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd(0.0, 0.2);
  const int spike = 40;
  Run r = drive(ctl, 60, [&](int t) {
    if (t == spike) return std::make_pair(12.0, 1.0 + nd(rng));
    return std::make_pair(2.0 + nd(rng), 1.0 + nd(rng));
  });
  CHECK(r.states[spike] == State::Denser);
  CHECK(r.targets[spike] < r.targets[spike - 1]);
  CHECK(r.t_in_means[spike] < r.t_in_means[spike - 1]);
  CHECK(r.targets[spike] <= ctl.target() - 0.10 + 0.15 + 1e-12);
}

void test_easy_run_makes_sparser() {
  Profile p = tiny_profile();
  ControllerConfig c;
  ThresholdController ctl(p, c, 1);
  std::mt19937_64 rng(2);
  std::normal_distribution<double> nd(0.0, 0.2);
  Run r = drive(ctl, 60, [&](int t) {
    if (t >= 40 && t < 50) return std::make_pair(0.01 * (50 - t) * 0.001, 0.001 * (50 - t) * 0.001);
    return std::make_pair(2.0 + nd(rng), 1.0 + nd(rng));
  });
  CHECK(r.states[40] != State::Sparser);                   // one easy step is not a run
  CHECK(r.states[40 + c.easy_steps - 1] == State::Sparser);  // easy_steps of them are
  CHECK(r.states[45] == State::Sparser);
  CHECK(r.targets[45] > r.targets[39]);
}

void test_budget_and_bounds() {
  Profile p = tiny_profile();
  std::vector<std::function<std::pair<double, double>(int)>> gens;
  std::mt19937_64 rng(3);
  std::lognormal_distribution<double> ln(0.0, 1.0);
  gens.push_back([&](int) { return std::make_pair(ln(rng), ln(rng)); });               // random
  gens.push_back([](int t) { return std::make_pair(1.0 + t, 1.0 + t); });              // always rising: always denser
  gens.push_back([](int t) { return std::make_pair(100.0 - t * 0.3, 50.0 - t * 0.1); });  // always falling: sparser
  gens.push_back([](int t) { return std::make_pair(t % 9 == 0 ? 9.0 : 1.0, 1.0); });     // periodic spikes
  gens.push_back([](int) { return std::make_pair(1.0, 1.0); });                          // constant: ties
  for (std::size_t g = 0; g < gens.size(); ++g) {
    ThresholdController ctl(p, ControllerConfig{}, 1);
    Run r = drive(ctl, 256, gens[g]);
    CHECK_NEAR(ctl.mean_sparsity(0), ctl.target(), 0.02);
    for (double s : r.targets) CHECK(s >= ctl.min_sparsity() && s <= ctl.max_sparsity());
  }
}

void test_determinism_and_batch_independence() {
  Profile p = tiny_profile();
  ControllerConfig c;
  c.trace_thresholds = true;
  // the same inputs twice: the same thresholds and decisions; sequence 1 of the batch
  // decides exactly as it does alone
  std::vector<std::vector<float>> outs[2];
  std::vector<double> targets[2], solo_targets;
  for (int run = 0; run < 2; ++run) {
    ThresholdController ctl(p, c, 3);
    std::mt19937_64 rng(4);
    std::lognormal_distribution<double> ln(0.0, 1.0);
    ctl.begin(nullptr);
    for (int t = 0; t < 100; ++t) {
      const double u0 = ln(rng), u1 = ln(rng), u2 = ln(rng), e0 = ln(rng), e1 = ln(rng), e2 = ln(rng);
      outs[run].push_back(ctl.step({u0, u1, u2}, {e0, e1, e2}));
      targets[run].push_back(ctl.last_record(1).target);
      CHECK(ctl.last_record(1).thresholds.size() == 2u * ctl.num_layers());
    }
  }
  CHECK(outs[0] == outs[1]);
  CHECK(targets[0] == targets[1]);
  ThresholdController solo(p, c, 1);
  std::mt19937_64 rng(4);
  std::lognormal_distribution<double> ln(0.0, 1.0);
  solo.begin(nullptr);
  for (int t = 0; t < 100; ++t) {
    ln(rng);
    const double u1 = ln(rng);
    ln(rng);
    ln(rng);
    const double e1 = ln(rng);
    ln(rng);
    solo.step({u1}, {e1});
    solo_targets.push_back(solo.last_record(0).target);
  }
  CHECK(solo_targets == targets[0]);
}

void test_prefix_scale() {
  Profile p = tiny_profile();
  ThresholdController ctl(p, ControllerConfig{}, 3);
  std::vector<double> act(ctl.out_size());
  for (int l = 0; l < 4; ++l)
    for (int k = 0; k < 2; ++k) {
      const double c = p.calib_mean_abs[l * 2 + k];
      act[(l * 3 + 0) * 2 + k] = c;        // seq 0: like calibration
      act[(l * 3 + 1) * 2 + k] = 1.5 * c;  // seq 1: larger activations -> larger thresholds
      act[(l * 3 + 2) * 2 + k] = 10.0 * c; // seq 2: clamped at scale_max
    }
  std::vector<float> thr = ctl.begin(&act);
  std::vector<float> st = ctl.static_thresholds();
  for (int l = 0; l < 4; ++l)
    for (int k = 0; k < 2; ++k) {
      CHECK(thr[(l * 3 + 0) * 2 + k] == st[(l * 3 + 0) * 2 + k]);
      CHECK_NEAR(thr[(l * 3 + 1) * 2 + k], 1.5 * st[(l * 3 + 1) * 2 + k], 1e-5);
      CHECK_NEAR(thr[(l * 3 + 2) * 2 + k], 2.0 * st[(l * 3 + 2) * 2 + k], 1e-5);
      CHECK(ctl.scale(l, 2, k) == 2.0);
    }
}

void test_config_validation() {
  int bad = 0;
  auto expect_bad = [&bad](const std::function<void(ControllerConfig&)>& edit) {
    ControllerConfig c;
    edit(c);
    try {
      c.validate();
    } catch (const std::invalid_argument&) {
      ++bad;
    }
  };
  expect_bad([](ControllerConfig& c) { c.min_history = 40; });
  expect_bad([](ControllerConfig& c) { c.window = 0; });
  expect_bad([](ControllerConfig& c) { c.low = 0.96; });
  expect_bad([](ControllerConfig& c) { c.dense_offset = -0.1; });
  expect_bad([](ControllerConfig& c) { c.scale_min = 1.5; });
  CHECK(bad == 5);
  ControllerConfig{}.validate();  // the defaults are valid
}

}  // namespace

int main() {
  test_interp();
  test_static_and_target();
  test_spike_makes_denser();
  test_easy_run_makes_sparser();
  test_budget_and_bounds();
  test_determinism_and_batch_independence();
  test_prefix_scale();
  test_config_validation();
  return clada_test::check_summary();
}
