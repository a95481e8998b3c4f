// Tests of the JSON side (no framework: CHECK macros, exit status). One executable,
// since each translation unit that includes nlohmann/json costs seconds to compile:
//
//   test_trace                        configuration records, number encoding, the trace
//                                     writer, the profile reader
//   test_trace --interp-golden FILE   clada::Profile::interp reproduces every expected
//                                     value of tests/data/interp_golden.json exactly (the
//                                     Python test checks interp_rows against the same file)
//   test_trace --print-defaults       the C++ defaults as JSON; tests/test_controller.py
//                                     compares them field by field with Python's
#include <clada/profile_reader.hpp>
#include <clada/trace.hpp>

#include "check.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using clada::ControllerConfig;
using clada::json::Json;

bool throws(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const std::exception& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) return true;
    std::fprintf(stderr, "threw, but without \"%s\": %s\n", needle.c_str(), e.what());
    return false;
  }
  return false;
}

clada::Profile small_profile() {
  clada::Profile p;
  p.fingerprint = "small";
  p.num_layers = 2;
  p.num_levels = 4;
  p.levels = {0.0, 0.25, 0.5, 0.75};
  p.t_in = {0.0, 0.1, 0.3, 0.7, 0.0, 0.2, 0.5, 0.9};
  p.t_mid = {0.0, 0.01, 0.02, 0.05, 0.0, 0.03, 0.04, 0.08};
  p.calib_mean_abs = {1.0, 0.1, 2.0, 0.2};
  p.s_in = {0.3, 0.5};
  p.s_mid = {0.4, 0.25};
  p.target_sparsity = 0.4;
  return p;
}

void test_numbers() {
  const double xs[] = {0.1, 1.0 / 3.0, 5e-320, 1e300, -0.0, 0.95 - 0.1, 0.30000000000000004};
  for (double x : xs) {
    const double back = clada::json::number(Json::parse(clada::json::encode(x).dump()), "x");
    CHECK(back == x && std::signbit(back) == std::signbit(x));
  }
  CHECK(std::isnan(clada::json::number(Json::parse(clada::json::encode(std::nan("")).dump()), "x")));
  CHECK(clada::json::encode(-std::numeric_limits<double>::infinity()) == "-Infinity");
  CHECK(clada::json::number(Json("Infinity"), "x") == std::numeric_limits<double>::infinity());
  CHECK(throws([] { clada::json::number(Json("abc"), "surprisal"); }, "surprisal must be a number"));
}

void test_config_json() {
  ControllerConfig c;
  c.window = 8;
  c.min_history = 3;
  c.target = 0.45;
  c.max_sparsity = 0.7;
  c.trace_thresholds = true;
  const ControllerConfig back = clada::trace::config_from_json(clada::trace::config_to_json(c));
  CHECK(back.window == 8 && back.min_history == 3 && back.target && *back.target == 0.45);
  CHECK(back.max_sparsity && *back.max_sparsity == 0.7 && !back.min_sparsity && back.trace_thresholds);
  CHECK(clada::trace::config_to_json(c).dump() == clada::trace::config_to_json(back).dump());
  // one key per field, in the declaration order
  const Json j = clada::trace::config_to_json(ControllerConfig{});
  CHECK(j.size() == 18u && j.begin().key() == "window" && (--j.end()).key() == "trace_thresholds");
  CHECK(throws([] { clada::trace::config_from_json(Json::parse(R"({"windows": 3})")); }, "unknown key \"windows\""));
  CHECK(throws([] { clada::trace::config_from_json(Json::parse(R"({"window": 2.5})")); }, "window must be an integer"));
  CHECK(throws([] { clada::trace::config_from_json(Json::parse(R"({"window": 1e12})")); }, "window must be an integer"));
  CHECK(throws([] { clada::trace::config_from_json(Json::parse(R"({"trace_thresholds": 1})")); },
               "trace_thresholds must be true or false"));
  CHECK(throws([] { clada::trace::config_from_json(Json::parse(R"({"high": "x"})")); }, "high must be a number"));
  CHECK(clada::trace::config_from_json(Json::parse(R"({"window": 16.0, "target": null})")).window == 16);
}

void test_writer() {
  ControllerConfig c;
  c.trace_thresholds = true;
  std::vector<std::string> a, b;
  for (auto* lines : {&a, &b}) {
    clada::ThresholdController ctl(small_profile(), c, 3);
    clada::trace::Writer w(ctl, [lines](const std::string& s) { lines->push_back(s); });
    std::vector<float> out(ctl.out_size());
    std::mt19937_64 rng(4);
    std::lognormal_distribution<double> ln(0.0, 1.0);
    for (int t = 0; t < 100; ++t) {  // no begin(): the first step begins without a prefix shift
      const double u[3] = {ln(rng), ln(rng), t == 50 ? std::nan("") : ln(rng)};
      const double e[3] = {ln(rng), ln(rng), ln(rng)};
      const std::uint8_t act[3] = {1, 1, static_cast<std::uint8_t>(t < 80)};
      w.step(u, e, nullptr, act, out.data());
    }
  }
  CHECK(a == b);
  CHECK(a.size() == 1 + 1 + 280);
  const Json head = Json::parse(a[0]), begin = Json::parse(a[1]), step = Json::parse(a[2]);
  CHECK(head["event"] == "config" && head["version"] == clada::trace::kVersion && head["batch"] == 3);
  CHECK(begin["event"] == "begin" && begin["act_stats"].is_null() && begin["scale_in_mean"] == Json::array({1.0, 1.0, 1.0}));
  CHECK(step["event"] == "step" && step["token"].is_null() && step["load"].is_null() && step["thresholds"].size() == 2u);
  const Json nan_step = Json::parse(a[2 + 50 * 3 + 2]);
  CHECK(nan_step["seq"] == 2 && nan_step["surprisal"] == "NaN");
}

void test_profile_reader() {
  Json d = {{"format", "clada-profile"}, {"version", 1}, {"fingerprint", "f"}, {"num_layers", 2},
            {"levels", {0.0, 0.5}}, {"t_in", {{0.0, 1.0}, {0.0, 2.0}}}, {"t_mid", {{0.0, 0.1}, {0.0, 0.2}}},
            {"calib_mean_abs", {{1.0, 0.1}, {2.0, 0.2}}}, {"s_in", {0.2, 0.3}}, {"s_mid", {0.1, 0.4}},
            {"target_sparsity", 0.3}};
  const clada::Profile p = clada::profile_from_json(d);
  CHECK(p.num_layers == 2 && p.num_levels == 2 && p.t_in[3] == 2.0 && p.calib_mean_abs[2] == 2.0);
  Json wrong = d;
  wrong["t_in"] = Json::array({Json::array({0.0, 1.0})});
  CHECK(throws([&] { clada::profile_from_json(wrong); }, "wrong sizes"));
  wrong = d;
  wrong.erase("s_mid");
  CHECK(throws([&] { clada::profile_from_json(wrong); }, "missing key \"s_mid\""));
  wrong = d;
  wrong["format"] = "other";
  CHECK(throws([&] { clada::profile_from_json(wrong); }, "not a clada sparsity profile"));
  CHECK(throws([] { clada::load_profile("/nonexistent/profile.json"); }, "/nonexistent/profile.json"));
}

int interp_golden(const std::string& path) {
  long checks = 0, failures = 0;
  try {
    const auto doc = clada::json::parse(clada::json::read_file(path), path);
    for (const auto& g : clada::json::at(doc, "groups")) {
      clada::Profile p;
      p.levels = clada::json::flat(clada::json::at(g, "levels"), "levels");
      p.num_levels = static_cast<int>(p.levels.size());
      const auto& table = clada::json::at(g, "table");
      p.num_layers = static_cast<int>(table.size());
      p.t_in = clada::json::flat(table, "table");
      const auto& xs = clada::json::at(g, "x");
      const auto& want = clada::json::at(g, "expected");
      for (std::size_t k = 0; k < xs.size(); ++k)
        for (int l = 0; l < p.num_layers; ++l) {
          const double x = clada::json::number(xs[k][l], "x");
          const double got = p.interp(p.t_in, l, x), exp = clada::json::number(want[k][l], "expected");
          ++checks;
          if (!(got == exp)) {
            ++failures;
            std::fprintf(stderr, "%s: row %d at x=%.17g: %.17g, expected %.17g\n",
                         g.at("name").get<std::string>().c_str(), l, x, got, exp);
          }
        }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "interp golden: %s\n", e.what());
    return 2;
  }
  std::printf("%ld interpolations, %ld differ\n", checks, failures);
  return checks > 0 && failures == 0 ? 0 : 1;
}

int print_defaults() {
  Json o;
  o["config"] = clada::trace::config_to_json(ControllerConfig{});
  o["default_below"] = clada::ThresholdController::kDefaultBelow;
  o["default_above"] = clada::ThresholdController::kDefaultAbove;
  o["trace_format"] = clada::trace::kFormat;
  o["trace_version"] = clada::trace::kVersion;
  std::cout << o.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--interp-golden" && argc == 3) return interp_golden(argv[2]);
  if (mode == "--print-defaults" && argc == 2) return print_defaults();
  if (argc != 1) {
    std::fprintf(stderr, "usage: test_trace [--interp-golden FILE | --print-defaults]\n");
    return 2;
  }
  test_numbers();
  test_config_json();
  test_writer();
  test_profile_reader();
  return clada_test::check_summary();
}
