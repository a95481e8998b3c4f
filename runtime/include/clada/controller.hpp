// CLADA threshold controller, header-only C++17, no dependencies.
//
// The same controller as clada_export/runtime/controller.py (the Python runtime's),
// decision for decision: sequence level (prefix scale from the prompt's activation
// statistics) and token level (percentile ranks of surprisal and entropy in a recent
// window -> normal / denser / sparser with hysteresis -> target byte sparsity with a
// budget -> per-layer thresholds). docs/controller.md describes the algorithm.
//
// Exactness: every formula below mirrors the Python one operation by operation, in
// double precision, with sums in layer order. Compile without floating-point
// contraction (-ffp-contract=off; the CMake target adds it) and without -ffast-math,
// or the last bits may differ from the Python side. The replay tests in
// runtime/tests and tests/test_controller.py hold the two implementations together.
//
// Contents:
//   clada::json            minimal JSON value, parser and number formatting
//   clada::Profile         the parts of a clada sparsity profile the controller needs
//   clada::ControllerConfig
//   clada::ThresholdController
//   clada::replay_trace    re-run a recorded JSONL trace
//
// Layouts: thresholds and act_stats are row-major [L, B, 2] (index (l * B + b) * 2 + k,
// k = 0 for the MLP input |x|, 1 for the intermediate |h|); profile tables [L, S].
#ifndef CLADA_CONTROLLER_HPP
#define CLADA_CONTROLLER_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <limits>
#include <locale>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#if defined(__has_include)
#if __has_include(<charconv>)
#include <charconv>
#endif
#endif

#if defined(__FAST_MATH__)
#warning "clada/controller.hpp: -ffast-math breaks NaN handling and bit-exact agreement with the Python controller"
#endif

namespace clada {

// ============================================================================ json
namespace json {

class Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // keeps key order

class Value {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Value() = default;
  static Value null() { return Value(); }
  static Value boolean(bool b) { Value v; v.type_ = Type::kBool; v.b_ = b; return v; }
  static Value number(double d, bool integer = false) {
    Value v; v.type_ = Type::kNumber; v.d_ = d; v.integer_ = integer; return v;
  }
  static Value string(std::string s) { Value v; v.type_ = Type::kString; v.s_ = std::move(s); return v; }
  static Value array(Array a = {}) {
    Value v; v.type_ = Type::kArray; v.a_ = std::make_shared<Array>(std::move(a)); return v;
  }
  static Value object(Object o = {}) {
    Value v; v.type_ = Type::kObject; v.o_ = std::make_shared<Object>(std::move(o)); return v;
  }

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_integer() const { return type_ == Type::kNumber && integer_; }

  double as_number() const { expect(Type::kNumber, "a number"); return d_; }
  bool as_bool() const { expect(Type::kBool, "true or false"); return b_; }
  const std::string& as_string() const { expect(Type::kString, "a string"); return s_; }
  const Array& as_array() const { expect(Type::kArray, "an array"); return *a_; }
  Array& as_array() { expect(Type::kArray, "an array"); return *a_; }
  const Object& as_object() const { expect(Type::kObject, "an object"); return *o_; }
  Object& as_object() { expect(Type::kObject, "an object"); return *o_; }

  const Value* find(const std::string& key) const {
    for (const auto& kv : as_object())
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  const Value& at(const std::string& key) const {
    const Value* v = find(key);
    if (!v) throw std::runtime_error("json: missing key \"" + key + "\"");
    return *v;
  }
  void set(const std::string& key, Value v) {
    for (auto& kv : as_object())
      if (kv.first == key) { kv.second = std::move(v); return; }
    as_object().emplace_back(key, std::move(v));
  }
  void push(Value v) { as_array().push_back(std::move(v)); }

 private:
  void expect(Type t, const char* what) const {
    if (type_ != t) throw std::runtime_error(std::string("json: expected ") + what);
  }
  Type type_ = Type::kNull;
  bool b_ = false;
  double d_ = 0.0;
  bool integer_ = false;
  std::string s_;
  std::shared_ptr<Array> a_;
  std::shared_ptr<Object> o_;
};

// Shortest text that reads back as the same double (%.17g; NaN/Infinity like Python's json).
inline std::string format_number(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  std::ostringstream os;
  os.imbue(std::locale::classic());
  os.precision(17);
  os << d;
  return os.str();
}

inline double parse_double(const std::string& text) {
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
  double d = 0.0;
  auto res = std::from_chars(text.data(), text.data() + text.size(), d);
  if (res.ec == std::errc() && res.ptr == text.data() + text.size()) return d;
#endif
  std::istringstream is(text);
  is.imbue(std::locale::classic());
  double v = 0.0;
  is >> v;
  if (is.fail()) throw std::runtime_error("json: bad number " + text);
  return v;
}

namespace detail {
struct Parser {
  const std::string& s;
  std::size_t i = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("json: " + what + " at offset " + std::to_string(i));
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool lit(const char* w) {
    std::size_t n = std::char_traits<char>::length(w);
    if (s.compare(i, n, w) == 0) { i += n; return true; }
    return false;
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) out += char(cp);
    else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    }
  }
  unsigned hex4() {
    if (i + 4 > s.size()) fail("short \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s[i++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string str() {
    if (s[i] != '"') fail("expected string");
    ++i;
    std::string out;
    while (true) {
      if (i >= s.size()) fail("unterminated string");
      char c = s[i++];
      if (c == '"') break;
      if (c != '\\') { out += c; continue; }
      if (i >= s.size()) fail("unterminated escape");
      char e = s[i++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < s.size() && s[i] == '\\' && s[i + 1] == 'u') {
            i += 2;
            unsigned lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }
  Value value() {
    ws();
    if (i >= s.size()) fail("unexpected end");
    char c = s[i];
    if (c == '{') {
      ++i;
      Value v = Value::object();
      ws();
      if (i < s.size() && s[i] == '}') { ++i; return v; }
      while (true) {
        ws();
        std::string k = str();
        ws();
        if (i >= s.size() || s[i] != ':') fail("expected ':'");
        ++i;
        v.as_object().emplace_back(std::move(k), value());
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == '}') { ++i; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++i;
      Value v = Value::array();
      ws();
      if (i < s.size() && s[i] == ']') { ++i; return v; }
      while (true) {
        v.as_array().push_back(value());
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == ']') { ++i; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') return Value::string(str());
    if (lit("null")) return Value::null();
    if (lit("true")) return Value::boolean(true);
    if (lit("false")) return Value::boolean(false);
    if (lit("NaN")) return Value::number(std::numeric_limits<double>::quiet_NaN());
    if (lit("Infinity")) return Value::number(std::numeric_limits<double>::infinity());
    if (lit("-Infinity")) return Value::number(-std::numeric_limits<double>::infinity());
    std::size_t start = i;
    bool integer = true;
    if (s[i] == '-') ++i;
    while (i < s.size()) {
      char d = s[i];
      if (d >= '0' && d <= '9') { ++i; continue; }
      if (d == '.' || d == 'e' || d == 'E' || d == '+' || d == '-') { integer = false; ++i; continue; }
      break;
    }
    if (i == start) fail("unexpected character");
    return Value::number(parse_double(s.substr(start, i - start)), integer);
  }
};
}  // namespace detail

inline Value parse(const std::string& text) {
  detail::Parser p{text};
  Value v = p.value();
  p.ws();
  if (p.i != text.size()) p.fail("trailing characters");
  return v;
}

inline void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          static const char* hx = "0123456789abcdef";
          out += "\\u00";
          out += hx[c >> 4];
          out += hx[c & 15];
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

inline void dump(std::string& out, const Value& v) {
  switch (v.type()) {
    case Value::Type::kNull: out += "null"; break;
    case Value::Type::kBool: out += v.as_bool() ? "true" : "false"; break;
    case Value::Type::kNumber: {
      double d = v.as_number();
      if (v.is_integer() && std::isfinite(d) && std::fabs(d) < 9.0e15) {
        out += std::to_string(static_cast<long long>(d));
      } else {
        out += format_number(d);
      }
      break;
    }
    case Value::Type::kString: dump_string(out, v.as_string()); break;
    case Value::Type::kArray: {
      out += '[';
      bool first = true;
      for (const auto& x : v.as_array()) {
        if (!first) out += ", ";
        first = false;
        dump(out, x);
      }
      out += ']';
      break;
    }
    case Value::Type::kObject: {
      out += '{';
      bool first = true;
      for (const auto& kv : v.as_object()) {
        if (!first) out += ", ";
        first = false;
        dump_string(out, kv.first);
        out += ": ";
        dump(out, kv.second);
      }
      out += '}';
      break;
    }
  }
}

inline std::string dump(const Value& v) {
  std::string out;
  dump(out, v);
  return out;
}

inline Value from_vector(const std::vector<double>& xs) {
  Array a;
  a.reserve(xs.size());
  for (double x : xs) a.push_back(Value::number(x));
  return Value::array(std::move(a));
}

inline std::vector<double> to_vector(const Value& v) {
  std::vector<double> out;
  for (const auto& x : v.as_array()) out.push_back(x.as_number());
  return out;
}

// Flatten nested arrays of numbers (row-major).
inline void flatten(const Value& v, std::vector<double>& out) {
  if (v.is_array()) {
    for (const auto& x : v.as_array()) flatten(x, out);
  } else {
    out.push_back(v.as_number());
  }
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// One JSON value per non-empty line.
inline std::vector<Value> read_jsonl(const std::string& path) {
  std::istringstream in(read_file(path));
  std::vector<Value> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    out.push_back(parse(line));
  }
  return out;
}

}  // namespace json

// ========================================================================= profile
// The controller's view of a clada sparsity profile (format "clada-profile", version 1).
struct Profile {
  std::string fingerprint;
  int num_layers = 0;
  int num_levels = 0;
  std::vector<double> levels;          // [S], strictly increasing
  std::vector<double> t_in, t_mid;     // [L, S]
  std::vector<double> calib_mean_abs;  // [L, 2]
  std::vector<double> s_in, s_mid;     // [L]
  double target_sparsity = 0.0;

  static Profile from_json(const json::Value& d) {
    const json::Value* fmt = d.find("format");
    if (!fmt || !fmt->is_string() || fmt->as_string() != "clada-profile")
      throw std::runtime_error("not a clada sparsity profile (no \"format\": \"clada-profile\")");
    if (d.at("version").as_number() != 1.0)
      throw std::runtime_error("unsupported clada profile version");
    Profile p;
    p.fingerprint = d.at("fingerprint").as_string();
    p.num_layers = static_cast<int>(d.at("num_layers").as_number());
    p.levels = json::to_vector(d.at("levels"));
    p.num_levels = static_cast<int>(p.levels.size());
    json::flatten(d.at("t_in"), p.t_in);
    json::flatten(d.at("t_mid"), p.t_mid);
    json::flatten(d.at("calib_mean_abs"), p.calib_mean_abs);
    p.s_in = json::to_vector(d.at("s_in"));
    p.s_mid = json::to_vector(d.at("s_mid"));
    p.target_sparsity = d.at("target_sparsity").as_number();
    p.validate();
    return p;
  }
  static Profile load(const std::string& path) { return from_json(json::parse(json::read_file(path))); }

  void validate() const {
    const std::size_t L = static_cast<std::size_t>(num_layers), S = levels.size();
    if (num_layers < 1 || S < 2) throw std::runtime_error("profile needs >= 1 layer and >= 2 levels");
    for (std::size_t k = 1; k < S; ++k)
      if (!(levels[k] > levels[k - 1])) throw std::runtime_error("profile levels must be strictly increasing");
    if (t_in.size() != L * S || t_mid.size() != L * S || calib_mean_abs.size() != L * 2 || s_in.size() != L ||
        s_mid.size() != L)
      throw std::runtime_error("profile arrays have the wrong sizes for its layers and levels");
  }

  // Linear interpolation in row l of table [L, S] at x, with numpy.interp's arithmetic.
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
// (docs/controller.md).
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

  static ControllerConfig from_json(const json::Value& o) {
    ControllerConfig c;
    auto as_int = [](const json::Value& v, const std::string& k) {
      double d = v.as_number();
      if (d != std::floor(d)) throw std::invalid_argument("controller config: " + k + " must be an integer");
      return static_cast<int>(d);
    };
    auto opt = [](const json::Value& v) -> std::optional<double> {
      if (v.is_null()) return std::nullopt;
      return v.as_number();
    };
    for (const auto& kv : o.as_object()) {
      const std::string& k = kv.first;
      const json::Value& v = kv.second;
      if (k == "window") c.window = as_int(v, k);
      else if (k == "min_history") c.min_history = as_int(v, k);
      else if (k == "high") c.high = v.as_number();
      else if (k == "high_margin") c.high_margin = v.as_number();
      else if (k == "low") c.low = v.as_number();
      else if (k == "easy_steps") c.easy_steps = as_int(v, k);
      else if (k == "low_margin") c.low_margin = v.as_number();
      else if (k == "dense_offset") c.dense_offset = v.as_number();
      else if (k == "sparse_offset") c.sparse_offset = v.as_number();
      else if (k == "min_sparsity") c.min_sparsity = opt(v);
      else if (k == "max_sparsity") c.max_sparsity = opt(v);
      else if (k == "payback_steps") c.payback_steps = as_int(v, k);
      else if (k == "max_correction") c.max_correction = v.as_number();
      else if (k == "target") c.target = opt(v);
      else if (k == "scale_min") c.scale_min = v.as_number();
      else if (k == "scale_max") c.scale_max = v.as_number();
      else if (k == "prefix_strength") c.prefix_strength = v.as_number();
      else if (k == "trace_thresholds") c.trace_thresholds = v.as_bool();
      else throw std::invalid_argument("controller config: unknown key \"" + k + "\"");
    }
    return c;
  }

  json::Value to_json() const {
    using json::Value;
    auto opt = [](const std::optional<double>& x) { return x ? Value::number(*x) : Value::null(); };
    json::Object o;
    o.emplace_back("window", Value::number(window, true));
    o.emplace_back("min_history", Value::number(min_history, true));
    o.emplace_back("high", Value::number(high));
    o.emplace_back("high_margin", Value::number(high_margin));
    o.emplace_back("low", Value::number(low));
    o.emplace_back("easy_steps", Value::number(easy_steps, true));
    o.emplace_back("low_margin", Value::number(low_margin));
    o.emplace_back("dense_offset", Value::number(dense_offset));
    o.emplace_back("sparse_offset", Value::number(sparse_offset));
    o.emplace_back("min_sparsity", opt(min_sparsity));
    o.emplace_back("max_sparsity", opt(max_sparsity));
    o.emplace_back("payback_steps", Value::number(payback_steps, true));
    o.emplace_back("max_correction", Value::number(max_correction));
    o.emplace_back("target", opt(target));
    o.emplace_back("scale_min", Value::number(scale_min));
    o.emplace_back("scale_max", Value::number(scale_max));
    o.emplace_back("prefix_strength", Value::number(prefix_strength));
    o.emplace_back("trace_thresholds", Value::boolean(trace_thresholds));
    return Value::object(std::move(o));
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

// One decision: the thresholds chosen for (the decode step after) step `step` of sequence `seq`.
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

  json::Value to_json() const {
    using json::Value;
    json::Object o;
    o.emplace_back("event", Value::string("step"));
    o.emplace_back("step", Value::number(static_cast<double>(step), true));
    o.emplace_back("seq", Value::number(seq, true));
    o.emplace_back("token", has_token ? Value::number(static_cast<double>(token), true) : Value::null());
    o.emplace_back("surprisal", Value::number(surprisal));
    o.emplace_back("entropy", Value::number(entropy));
    o.emplace_back("load", has_load ? Value::number(load) : Value::null());
    o.emplace_back("state", Value::string(state_name(state)));
    o.emplace_back("target", Value::number(target));
    o.emplace_back("realized", Value::number(realized));
    o.emplace_back("debt", Value::number(debt));
    o.emplace_back("t_in_mean", Value::number(t_in_mean));
    o.emplace_back("t_mid_mean", Value::number(t_mid_mean));
    if (!thresholds.empty()) {
      json::Array rows;
      for (std::size_t l = 0; l + 1 < thresholds.size(); l += 2)
        rows.push_back(Value::array({Value::number(thresholds[l]), Value::number(thresholds[l + 1])}));
      o.emplace_back("thresholds", Value::array(std::move(rows)));
    }
    return Value::object(std::move(o));
  }
};

// =================================================================== controller
class ThresholdController {
 public:
  static constexpr double kDefaultBelow = 0.20;  // min_sparsity = max(levels[0], target - 0.20)
  static constexpr double kDefaultAbove = 0.15;  // max_sparsity = min(levels[-1], target + 0.15)
  static constexpr const char* kTraceFormat = "clada-controller-trace";
  static constexpr int kTraceVersion = 1;

  // sink: optional; receives every trace record as one JSON line (no newline).
  ThresholdController(Profile profile, ControllerConfig config, int batch,
                      std::function<void(const std::string&)> sink = nullptr)
      : p_(std::move(profile)), c_(config), B_(batch), sink_(std::move(sink)) {
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
    emit(config_record());
    reset(nullptr);
  }

  int num_layers() const { return L_; }
  int batch() const { return B_; }
  double target() const { return target_; }
  double min_sparsity() const { return min_s_; }
  double max_sparsity() const { return max_s_; }
  const ControllerConfig& config() const { return c_; }
  std::size_t out_size() const { return static_cast<std::size_t>(L_) * B_ * 2; }

  // Start a generation. act_stats: [L, B, 2] mean |x|, mean |h| over each prompt's
  // valid tokens, or nullptr (no prefix shift). out: [L, B, 2] thresholds at the
  // target with the prefix scale (not counted in the budget). Resets all state.
  void begin(const double* act_stats, float* out) {
    emit(reset(act_stats));
    begun_ = true;
    std::copy(last_.begin(), last_.end(), out);
  }
  std::vector<float> begin(const std::vector<double>* act_stats = nullptr) {
    if (act_stats && act_stats->size() != out_size()) throw std::invalid_argument("act_stats must be [L, B, 2]");
    std::vector<float> out(out_size());
    begin(act_stats ? act_stats->data() : nullptr, out.data());
    return out;
  }

  // One decode step's signals -> the next decode step's thresholds.
  // surprisal, entropy: [B] nats; tokens: [B] or nullptr (trace only);
  // active: [B] (nonzero = generating) or nullptr (all). out: [L, B, 2].
  void step(const double* surprisal, const double* entropy, const std::int64_t* tokens,
            const std::uint8_t* active, float* out) {
    if (!begun_) {
      emit(reset(nullptr));
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
  double debt(int b) const { return debt_[b]; }
  double scale(int l, int b, int k) const { return scale_[(static_cast<std::size_t>(l) * B_ + b) * 2 + k]; }
  // The decision last made for sequence b (valid after its first active step).
  const StepRecord& last_record(int b) const { return last_rec_[b]; }
  long long step_index() const { return step_index_; }

 private:
  // Allocation shifted by `shift`, clipped to the table's levels; returns the realized
  // byte sparsity (mean over layers of (2 * s_in + s_mid) / 3, summed in layer order).
  double levels_at(double shift, std::vector<double>& ci, std::vector<double>& cm) const {
    ci.resize(L_);
    cm.resize(L_);
    double acc = 0.0;
    for (int l = 0; l < L_; ++l) {
      ci[l] = std::min(std::max(p_.s_in[l] + shift, lo_), hi_);
      cm[l] = std::min(std::max(p_.s_mid[l] + shift, lo_), hi_);
      acc += (2.0 * ci[l] + cm[l]) / 3.0;
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

  json::Value reset(const double* act_stats) {
    using json::Value;
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
    if (!sink_) return Value();
    json::Object o;
    o.emplace_back("event", Value::string("begin"));
    if (act_stats) {
      json::Array rows;
      for (int l = 0; l < L_; ++l) {
        json::Array seqs;
        for (int b = 0; b < B_; ++b) {
          const std::size_t i = (static_cast<std::size_t>(l) * B_ + b) * 2;
          seqs.push_back(Value::array({Value::number(act_stats[i]), Value::number(act_stats[i + 1])}));
        }
        rows.push_back(Value::array(std::move(seqs)));
      }
      o.emplace_back("act_stats", Value::array(std::move(rows)));
    } else {
      o.emplace_back("act_stats", Value::null());
    }
    json::Array sin, smid;
    for (int b = 0; b < B_; ++b) {
      double ai = 0.0, am = 0.0;
      for (int l = 0; l < L_; ++l) ai += scale(l, b, 0);
      for (int l = 0; l < L_; ++l) am += scale(l, b, 1);
      sin.push_back(Value::number(ai / static_cast<double>(L_)));
      smid.push_back(Value::number(am / static_cast<double>(L_)));
    }
    o.emplace_back("scale_in_mean", Value::array(std::move(sin)));
    o.emplace_back("scale_mid_mean", Value::array(std::move(smid)));
    return Value::object(std::move(o));
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
    if (sink_) sink_(json::dump(r.to_json()));
  }

  json::Value config_record() const {
    using json::Value;
    json::Object o;
    o.emplace_back("event", Value::string("config"));
    o.emplace_back("format", Value::string(kTraceFormat));
    o.emplace_back("version", Value::number(kTraceVersion, true));
    o.emplace_back("batch", Value::number(B_, true));
    o.emplace_back("num_layers", Value::number(L_, true));
    o.emplace_back("num_levels", Value::number(p_.num_levels, true));
    o.emplace_back("profile_fingerprint", Value::string(p_.fingerprint));
    o.emplace_back("target", Value::number(target_));
    o.emplace_back("min_sparsity", Value::number(min_s_));
    o.emplace_back("max_sparsity", Value::number(max_s_));
    o.emplace_back("config", c_.to_json());
    return Value::object(std::move(o));
  }

  void emit(const json::Value& rec) {
    if (sink_ && !rec.is_null()) sink_(json::dump(rec));
  }

  Profile p_;
  ControllerConfig c_;
  int B_ = 1;
  int L_ = 0;
  std::function<void(const std::string&)> sink_;
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

// ========================================================================= replay
// Re-run a recorded trace (records as parsed JSON values, the first one the config
// record) through a fresh controller; returns the new trace lines (JSON text).
inline std::vector<std::string> replay_trace(const Profile& profile, const std::vector<json::Value>& recs) {
  if (recs.empty() || !recs[0].is_object() || recs[0].at("event").as_string() != "config" ||
      recs[0].at("format").as_string() != ThresholdController::kTraceFormat)
    throw std::runtime_error("not a controller trace (first record is not its config)");
  const json::Value& head = recs[0];
  if (head.at("version").as_number() != ThresholdController::kTraceVersion)
    throw std::runtime_error("unsupported controller trace version");
  if (static_cast<int>(head.at("num_layers").as_number()) != profile.num_layers ||
      static_cast<int>(head.at("num_levels").as_number()) != profile.num_levels)
    throw std::runtime_error("controller trace was recorded with another profile (layer or level count differs)");
  const int B = static_cast<int>(head.at("batch").as_number());
  std::vector<std::string> lines;
  ThresholdController ctl(profile, ControllerConfig::from_json(head.at("config")), B,
                          [&lines](const std::string& s) { lines.push_back(s); });
  std::vector<float> out(ctl.out_size());
  std::size_t i = 1;
  while (i < recs.size()) {
    const json::Value& r = recs[i];
    const std::string& ev = r.at("event").as_string();
    if (ev == "begin") {
      const json::Value& a = r.at("act_stats");
      if (a.is_null()) {
        ctl.begin(nullptr, out.data());
      } else {
        std::vector<double> flat;
        json::flatten(a, flat);
        if (flat.size() != ctl.out_size()) throw std::runtime_error("trace act_stats has the wrong size");
        ctl.begin(flat.data(), out.data());
      }
      ++i;
      continue;
    }
    if (ev != "step") throw std::runtime_error("unknown trace event " + ev);
    const long long t = static_cast<long long>(r.at("step").as_number());
    std::vector<double> u(B, 0.0), e(B, 0.0);
    std::vector<std::int64_t> tok(B, 0);
    std::vector<std::uint8_t> act(B, 0);
    bool has_tok = true;
    while (i < recs.size() && recs[i].at("event").as_string() == "step" &&
           static_cast<long long>(recs[i].at("step").as_number()) == t) {
      const json::Value& g = recs[i];
      const int b = static_cast<int>(g.at("seq").as_number());
      u[b] = g.at("surprisal").as_number();
      e[b] = g.at("entropy").as_number();
      act[b] = 1;
      if (g.at("token").is_null()) has_tok = false;
      else tok[b] = static_cast<std::int64_t>(g.at("token").as_number());
      ++i;
    }
    std::vector<std::uint8_t> none(B, 0);
    std::vector<double> zero(B, 0.0);
    while (ctl.step_index() < t) ctl.step(zero.data(), zero.data(), nullptr, none.data(), out.data());
    ctl.step(u.data(), e.data(), has_tok ? tok.data() : nullptr, act.data(), out.data());
  }
  return lines;
}

}  // namespace clada

#endif  // CLADA_CONTROLLER_HPP
