// Controller traces: the JSON-lines records that clada_export/runtime/controller.py
// writes (docs/controller.md, "Traces"), a writer that records a controller's
// decisions, and replay of a recorded trace through a fresh controller.
//
// Records, one JSON object per line: a "config" record first, then per generation a
// "begin" record and one "step" record per (step, active sequence).
#ifndef CLADA_TRACE_HPP
#define CLADA_TRACE_HPP

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <clada/controller.hpp>
#include <clada/json.hpp>

namespace clada::trace {

using json::Json;

inline constexpr const char* kFormat = "clada-controller-trace";
inline constexpr int kVersion = 2;  // 2: non-finite numbers as strings (strict JSON)

// ------------------------------------------------------------------ configuration
inline Json config_to_json(const ControllerConfig& c) {
  Json o = Json::object();
  ControllerConfig::for_each_field(c, [&o](const char* name, const auto& v) {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, std::optional<double>>) o[name] = v ? json::encode(*v) : Json();
    else if constexpr (std::is_same_v<T, double>) o[name] = json::encode(v);
    else o[name] = v;  // int, bool
  });
  return o;
}

// Fields not named keep their defaults; an unknown key, or a value of the wrong type,
// is an error naming the field.
inline ControllerConfig config_from_json(const Json& o) {
  if (!o.is_object()) throw std::invalid_argument("controller config must be a JSON object");
  ControllerConfig c;
  std::size_t known = 0;
  ControllerConfig::for_each_field(c, [&o, &known](const char* name, auto& v) {
    auto it = o.find(name);
    if (it == o.end()) return;
    ++known;
    const Json& x = *it;
    const std::string what = std::string("controller config: ") + name;
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, bool>) {
      if (!x.is_boolean()) throw std::invalid_argument(what + " must be true or false, got " + x.dump());
      v = x.get<bool>();
    } else if constexpr (std::is_same_v<T, int>) {
      if (!x.is_number() || x.get<double>() != std::floor(x.get<double>()) ||
          std::fabs(x.get<double>()) > std::numeric_limits<int>::max())
        throw std::invalid_argument(what + " must be an integer of at most " +
                                    std::to_string(std::numeric_limits<int>::max()) + ", got " + x.dump());
      v = static_cast<int>(x.get<double>());
    } else if constexpr (std::is_same_v<T, std::optional<double>>) {
      if (x.is_null()) v = std::nullopt;
      else v = json::number(x, what);
    } else {
      v = json::number(x, what);
    }
  });
  if (known != o.size()) {
    for (const auto& kv : o.items()) {
      bool found = false;
      ControllerConfig::for_each_field(c, [&](const char* name, const auto&) { found = found || kv.key() == name; });
      if (!found) throw std::invalid_argument("controller config: unknown key \"" + kv.key() + "\"");
    }
  }
  return c;
}

// ------------------------------------------------------------------------ records
inline Json config_record(const ThresholdController& ctl) {
  Json o = Json::object();
  o["event"] = "config";
  o["format"] = kFormat;
  o["version"] = kVersion;
  o["batch"] = ctl.batch();
  o["num_layers"] = ctl.num_layers();
  o["num_levels"] = ctl.profile().num_levels;
  o["profile_fingerprint"] = ctl.profile().fingerprint;
  o["target"] = json::encode(ctl.target());
  o["min_sparsity"] = json::encode(ctl.min_sparsity());
  o["max_sparsity"] = json::encode(ctl.max_sparsity());
  o["config"] = config_to_json(ctl.config());
  return o;
}

// After ctl.begin(act_stats, ...): the inputs and the prefix scale's mean per sequence.
inline Json begin_record(const ThresholdController& ctl, const double* act_stats) {
  const int L = ctl.num_layers(), B = ctl.batch();
  Json o = Json::object();
  o["event"] = "begin";
  if (act_stats) {
    Json rows = Json::array();
    for (int l = 0; l < L; ++l) {
      Json seqs = Json::array();
      for (int b = 0; b < B; ++b) {
        const std::size_t i = (static_cast<std::size_t>(l) * B + b) * 2;
        seqs.push_back(Json::array({json::encode(act_stats[i]), json::encode(act_stats[i + 1])}));
      }
      rows.push_back(std::move(seqs));
    }
    o["act_stats"] = std::move(rows);
  } else {
    o["act_stats"] = nullptr;
  }
  Json sin = Json::array(), smid = Json::array();
  for (int b = 0; b < B; ++b) {
    double ai = 0.0, am = 0.0;  // sums in layer order, then one division (as in Python)
    for (int l = 0; l < L; ++l) ai += ctl.scale(l, b, 0);
    for (int l = 0; l < L; ++l) am += ctl.scale(l, b, 1);
    sin.push_back(json::encode(ai / static_cast<double>(L)));
    smid.push_back(json::encode(am / static_cast<double>(L)));
  }
  o["scale_in_mean"] = std::move(sin);
  o["scale_mid_mean"] = std::move(smid);
  return o;
}

inline Json step_record(const StepRecord& r) {
  Json o = Json::object();
  o["event"] = "step";
  o["step"] = r.step;
  o["seq"] = r.seq;
  o["token"] = r.has_token ? Json(r.token) : Json();
  o["surprisal"] = json::encode(r.surprisal);
  o["entropy"] = json::encode(r.entropy);
  o["load"] = r.has_load ? json::encode(r.load) : Json();
  o["state"] = state_name(r.state);
  o["target"] = json::encode(r.target);
  o["realized"] = json::encode(r.realized);
  o["debt"] = json::encode(r.debt);
  o["t_in_mean"] = json::encode(r.t_in_mean);
  o["t_mid_mean"] = json::encode(r.t_mid_mean);
  if (!r.thresholds.empty()) {
    Json rows = Json::array();
    for (std::size_t l = 0; l + 1 < r.thresholds.size(); l += 2)
      rows.push_back(Json::array({json::encode(r.thresholds[l]), json::encode(r.thresholds[l + 1])}));
    o["thresholds"] = std::move(rows);
  }
  return o;
}

// ------------------------------------------------------------------------- writer
// Drives a controller and hands every record to `sink` as one JSON line (no newline):
// the config record at construction, a begin record per begin(), a step record per
// active sequence per step(). Same calls and shapes as ThresholdController's.
class Writer {
 public:
  Writer(ThresholdController& ctl, std::function<void(const std::string&)> sink)
      : ctl_(ctl), sink_(std::move(sink)) {
    emit(config_record(ctl_));
  }

  void begin(const double* act_stats, float* out) {
    ctl_.begin(act_stats, out);
    emit(begin_record(ctl_, act_stats));
  }

  void step(const double* surprisal, const double* entropy, const std::int64_t* tokens,
            const std::uint8_t* active, float* out) {
    if (!ctl_.begun()) {  // the controller begins by itself, without a prefix shift
      std::vector<float> first(ctl_.out_size());
      begin(nullptr, first.data());
    }
    ctl_.step(surprisal, entropy, tokens, active, out);
    for (int b = 0; b < ctl_.batch(); ++b)
      if (!active || active[b]) emit(step_record(ctl_.last_record(b)));
  }

 private:
  void emit(const Json& rec) { sink_(rec.dump()); }
  ThresholdController& ctl_;
  std::function<void(const std::string&)> sink_;
};

// ------------------------------------------------------------------------- replay
// Re-run a recorded trace (records parsed, the first one the config record) through a
// fresh controller built from that config; returns the new trace lines (JSON text).
inline std::vector<std::string> replay(const Profile& profile, const std::vector<Json>& recs) {
  if (recs.empty() || !recs[0].is_object() || recs[0].value("event", "") != "config" ||
      recs[0].value("format", "") != kFormat)
    throw std::runtime_error("not a controller trace (first record is not its config)");
  const Json& head = recs[0];
  const double version = json::number(json::at(head, "version"), "version");
  if (version != kVersion)
    throw std::runtime_error("controller trace version " + json::at(head, "version").dump() + ", this reads " +
                             std::to_string(kVersion) + "; record it again");
  if (static_cast<int>(json::number(json::at(head, "num_layers"), "num_layers")) != profile.num_layers ||
      static_cast<int>(json::number(json::at(head, "num_levels"), "num_levels")) != profile.num_levels)
    throw std::runtime_error("controller trace was recorded with another profile (layer or level count differs)");
  const int B = static_cast<int>(json::number(json::at(head, "batch"), "batch"));
  ThresholdController ctl(profile, config_from_json(json::at(head, "config")), B);
  std::vector<std::string> lines;
  Writer w(ctl, [&lines](const std::string& s) { lines.push_back(s); });
  std::vector<float> out(ctl.out_size());
  auto event = [](const Json& r) { return json::at(r, "event").get<std::string>(); };
  auto step_of = [](const Json& r) { return static_cast<long long>(json::number(json::at(r, "step"), "step")); };
  std::size_t i = 1;
  while (i < recs.size()) {
    const Json& r = recs[i];
    const std::string ev = event(r);
    if (ev == "begin") {
      const Json& a = json::at(r, "act_stats");
      if (a.is_null()) {
        w.begin(nullptr, out.data());
      } else {
        std::vector<double> act = json::flat(a, "act_stats");
        if (act.size() != ctl.out_size()) throw std::runtime_error("trace act_stats has the wrong size");
        w.begin(act.data(), out.data());
      }
      ++i;
      continue;
    }
    if (ev != "step") throw std::runtime_error("unknown trace event " + ev);
    const long long t = step_of(r);
    std::vector<double> u(B, 0.0), e(B, 0.0);
    std::vector<std::int64_t> tok(B, 0);
    std::vector<std::uint8_t> act(B, 0);
    bool has_tok = true;
    for (; i < recs.size() && event(recs[i]) == "step" && step_of(recs[i]) == t; ++i) {
      const Json& g = recs[i];
      const int b = static_cast<int>(json::number(json::at(g, "seq"), "seq"));
      if (b < 0 || b >= B) throw std::runtime_error("trace step record has seq " + std::to_string(b));
      u[b] = json::number(json::at(g, "surprisal"), "surprisal");
      e[b] = json::number(json::at(g, "entropy"), "entropy");
      act[b] = 1;
      const Json& tk = json::at(g, "token");
      if (tk.is_null()) has_tok = false;
      else tok[b] = tk.get<std::int64_t>();
    }
    const std::vector<std::uint8_t> none(B, 0);
    const std::vector<double> zero(B, 0.0);
    while (ctl.step_index() < t) w.step(zero.data(), zero.data(), nullptr, none.data(), out.data());
    w.step(u.data(), e.data(), has_tok ? tok.data() : nullptr, act.data(), out.data());
  }
  return lines;
}

}  // namespace clada::trace

#endif  // CLADA_TRACE_HPP
