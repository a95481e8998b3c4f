// JSON helpers shared by the profile reader and the trace records, on nlohmann/json
// (Debian: nlohmann-json3-dev; CMake: find_package(nlohmann_json)).
//
// Numbers: JSON has no NaN or infinity, and a trace can hold them (a NaN surprisal,
// an infinite one). The trace format writes them as the strings "NaN", "Infinity"
// and "-Infinity", like clada_export/runtime/controller.py does; number() reads both.
#ifndef CLADA_JSON_HPP
#define CLADA_JSON_HPP

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace clada::json {

using Json = nlohmann::ordered_json;  // keeps key order, so records read like Python's

// A double as JSON: a number, or one of the three strings for non-finite values.
inline Json encode(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return d;
}

// The inverse of encode(); `what` names the field in the error.
inline double number(const Json& v, const std::string& what) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    if (s == "NaN") return std::numeric_limits<double>::quiet_NaN();
    if (s == "Infinity") return std::numeric_limits<double>::infinity();
    if (s == "-Infinity") return -std::numeric_limits<double>::infinity();
  }
  throw std::runtime_error(what + " must be a number, got " + v.dump());
}

// The member `key` of object `o`; the error names it.
inline const Json& at(const Json& o, const std::string& key) {
  if (!o.is_object()) throw std::runtime_error("expected a JSON object holding \"" + key + "\"");
  auto it = o.find(key);
  if (it == o.end()) throw std::runtime_error("missing key \"" + key + "\"");
  return *it;
}

// Nested arrays of numbers, flattened row-major.
inline void flatten(const Json& v, const std::string& what, std::vector<double>& out) {
  if (v.is_array()) {
    for (const auto& x : v) flatten(x, what, out);
  } else {
    out.push_back(number(v, what));
  }
}

inline std::vector<double> flat(const Json& v, const std::string& what) {
  std::vector<double> out;
  flatten(v, what, out);
  return out;
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline Json parse(const std::string& text, const std::string& where) {
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(where + " is not valid JSON (" + e.what() + ")");
  }
}

// One JSON value per non-empty line.
inline std::vector<Json> read_jsonl(const std::string& path) {
  std::istringstream in(read_file(path));
  std::vector<Json> out;
  std::string line;
  for (std::size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    out.push_back(parse(line, path + " line " + std::to_string(n)));
  }
  return out;
}

}  // namespace clada::json

#endif  // CLADA_JSON_HPP
