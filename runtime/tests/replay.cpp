// clada_replay PROFILE TRACE [--out FILE] [--rtol X]
//
// Replays a JSONL trace recorded by the Python controller (or by this one) through the
// C++ controller and compares every record: states, steps and sequence ids exactly,
// numbers exactly (default) or to a relative tolerance. Writes the C++ trace to FILE
// when asked (tests/test_controller.py compares it with Python's). Exit status: 0 when
// all decisions are identical, 1 when they differ, 2 on bad input.
#include <clada/controller.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

using clada::json::Value;

bool num_equal(double a, double b, double rtol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (a == b) return true;
  return std::fabs(a - b) <= rtol * std::max(std::fabs(a), std::fabs(b));
}

// Same rules as compare_traces in clada_export/runtime/controller.py.
bool equal(const Value& a, const Value& b, double rtol, const std::string& where, std::vector<std::string>& diffs) {
  if (a.type() != b.type()) {
    diffs.push_back(where + ": types differ (" + clada::json::dump(a) + " vs " + clada::json::dump(b) + ")");
    return false;
  }
  switch (a.type()) {
    case Value::Type::kNull: return true;
    case Value::Type::kBool:
      if (a.as_bool() != b.as_bool()) { diffs.push_back(where + ": differs"); return false; }
      return true;
    case Value::Type::kNumber:
      if (!num_equal(a.as_number(), b.as_number(), rtol)) {
        diffs.push_back(where + ": " + clada::json::format_number(a.as_number()) + " != " +
                        clada::json::format_number(b.as_number()));
        return false;
      }
      return true;
    case Value::Type::kString:
      if (a.as_string() != b.as_string()) {
        diffs.push_back(where + ": \"" + a.as_string() + "\" != \"" + b.as_string() + "\"");
        return false;
      }
      return true;
    case Value::Type::kArray: {
      const auto& x = a.as_array();
      const auto& y = b.as_array();
      if (x.size() != y.size()) { diffs.push_back(where + ": lengths differ"); return false; }
      bool ok = true;
      for (std::size_t i = 0; i < x.size(); ++i) ok = equal(x[i], y[i], rtol, where + "[" + std::to_string(i) + "]", diffs) && ok;
      return ok;
    }
    case Value::Type::kObject: {
      bool ok = true;
      for (const auto& kv : a.as_object()) {
        const Value* o = b.find(kv.first);
        if (!o) { diffs.push_back(where + "." + kv.first + ": missing on one side"); ok = false; continue; }
        ok = equal(kv.second, *o, rtol, where + "." + kv.first, diffs) && ok;
      }
      for (const auto& kv : b.as_object())
        if (!a.find(kv.first)) { diffs.push_back(where + "." + kv.first + ": missing on one side"); ok = false; }
      return ok;
    }
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: clada_replay PROFILE TRACE [--out FILE] [--rtol X]\n";
    return 2;
  }
  std::string out_path;
  double rtol = 0.0;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--rtol" && i + 1 < argc) rtol = std::atof(argv[++i]);
    else { std::cerr << "unknown argument " << a << "\n"; return 2; }
  }
  std::vector<Value> recorded;
  std::vector<std::string> lines;
  try {
    clada::Profile profile = clada::Profile::load(argv[1]);
    recorded = clada::json::read_jsonl(argv[2]);
    lines = clada::replay_trace(profile, recorded);
  } catch (const std::exception& e) {
    std::cerr << "clada_replay: " << e.what() << "\n";
    return 2;
  }
  if (!out_path.empty()) {
    std::ofstream f(out_path);
    for (const auto& l : lines) f << l << "\n";
  }
  std::vector<std::string> diffs;
  if (lines.size() != recorded.size())
    diffs.push_back("record count " + std::to_string(recorded.size()) + " recorded, " + std::to_string(lines.size()) +
                    " replayed");
  std::size_t steps = 0, exact_fields = 0;
  for (std::size_t i = 0; i < std::min(lines.size(), recorded.size()) && diffs.size() < 20; ++i) {
    Value mine = clada::json::parse(lines[i]);
    equal(recorded[i], mine, rtol, "record " + std::to_string(i), diffs);
    if (mine.at("event").as_string() == "step") ++steps;
    ++exact_fields;
  }
  if (!diffs.empty()) {
    std::cerr << argv[2] << ": replay differs from the recorded trace:\n";
    for (const auto& d : diffs) std::cerr << "  " << d << "\n";
    return 1;
  }
  std::cout << argv[2] << ": " << recorded.size() << " records (" << steps << " step decisions) identical"
            << (rtol > 0 ? " within rtol" : "") << "\n";
  return 0;
}
