// clada_replay PROFILE TRACE [--out FILE] [--rtol X]
//
// Replays a JSONL trace recorded by the Python controller (or by this one) through the
// C++ controller and compares every record: states, steps and sequence ids exactly,
// numbers exactly (default) or to a relative tolerance, the same rules as
// compare_traces in clada_export/runtime/controller.py. Writes the C++ trace to FILE
// when asked (tests/test_controller.py compares it with Python's). Exit status: 0 when
// all decisions are identical, 1 when they differ, 2 on bad input.
#include <clada/profile_reader.hpp>
#include <clada/trace.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

using clada::json::Json;

bool is_number(const Json& v) {
  return v.is_number() || (v.is_string() && (v == "NaN" || v == "Infinity" || v == "-Infinity"));
}

bool num_equal(double a, double b, double rtol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (a == b) return true;
  return std::fabs(a - b) <= rtol * std::max(std::fabs(a), std::fabs(b));
}

void compare(const Json& a, const Json& b, double rtol, const std::string& where, std::vector<std::string>& diffs) {
  if (is_number(a) && is_number(b)) {
    if (!num_equal(clada::json::number(a, where), clada::json::number(b, where), rtol))
      diffs.push_back(where + ": " + a.dump() + " != " + b.dump());
  } else if (a.is_array() && b.is_array()) {
    if (a.size() != b.size()) {
      diffs.push_back(where + ": lengths differ");
      return;
    }
    for (std::size_t i = 0; i < a.size(); ++i) compare(a[i], b[i], rtol, where + "[" + std::to_string(i) + "]", diffs);
  } else if (a.is_object() && b.is_object()) {
    for (const auto& kv : a.items()) {
      if (!b.contains(kv.key())) diffs.push_back(where + "." + kv.key() + ": missing on one side");
      else compare(kv.value(), b.at(kv.key()), rtol, where + "." + kv.key(), diffs);
    }
    for (const auto& kv : b.items())
      if (!a.contains(kv.key())) diffs.push_back(where + "." + kv.key() + ": missing on one side");
  } else if (a != b) {  // null, bool, string, or different types
    diffs.push_back(where + ": " + a.dump() + " != " + b.dump());
  }
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
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (a == "--rtol" && i + 1 < argc) {
      char* end = nullptr;
      rtol = std::strtod(argv[++i], &end);
      if (*end != '\0' || !(rtol >= 0.0)) {
        std::cerr << "clada_replay: --rtol needs a number >= 0, got " << argv[i] << "\n";
        return 2;
      }
    } else {
      std::cerr << "clada_replay: unknown argument " << a << "\n";
      return 2;
    }
  }
  std::vector<Json> recorded;
  std::vector<std::string> lines;
  try {
    const clada::Profile profile = clada::load_profile(argv[1]);
    recorded = clada::json::read_jsonl(argv[2]);
    lines = clada::trace::replay(profile, recorded);
  } catch (const std::exception& e) {
    std::cerr << "clada_replay: " << argv[2] << ": " << e.what() << "\n";
    return 2;
  }
  if (!out_path.empty()) {
    std::ofstream f(out_path);
    for (const auto& l : lines) f << l << "\n";
    if (!f) {
      std::cerr << "clada_replay: cannot write " << out_path << "\n";
      return 2;
    }
  }
  std::vector<std::string> diffs;
  if (lines.size() != recorded.size())
    diffs.push_back("record count " + std::to_string(recorded.size()) + " recorded, " + std::to_string(lines.size()) +
                    " replayed");
  std::size_t steps = 0;
  for (std::size_t i = 0; i < std::min(lines.size(), recorded.size()) && diffs.size() < 20; ++i) {
    const Json mine = Json::parse(lines[i]);
    compare(recorded[i], mine, rtol, "record " + std::to_string(i), diffs);
    if (mine.at("event") == "step") ++steps;
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
