// Reads a clada sparsity profile (the JSON that `clada-export calibrate` writes,
// format "clada-profile", version 1; clada_export/profile.py) into clada::Profile.
#ifndef CLADA_PROFILE_READER_HPP
#define CLADA_PROFILE_READER_HPP

#include <stdexcept>
#include <string>

#include <clada/controller.hpp>
#include <clada/json.hpp>

namespace clada {

inline Profile profile_from_json(const json::Json& d) {
  const auto fmt = d.is_object() ? d.find("format") : d.end();
  if (fmt == d.end() || !fmt->is_string() || fmt->get<std::string>() != "clada-profile")
    throw std::runtime_error("not a clada sparsity profile (no \"format\": \"clada-profile\")");
  if (json::number(json::at(d, "version"), "version") != 1.0)
    throw std::runtime_error("unsupported clada profile version " + json::at(d, "version").dump() +
                             "; this reader reads version 1");
  Profile p;
  const json::Json& fp = json::at(d, "fingerprint");
  if (!fp.is_string()) throw std::runtime_error("fingerprint must be a string");
  p.fingerprint = fp.get<std::string>();
  p.num_layers = static_cast<int>(json::number(json::at(d, "num_layers"), "num_layers"));
  p.levels = json::flat(json::at(d, "levels"), "levels");
  p.num_levels = static_cast<int>(p.levels.size());
  p.t_in = json::flat(json::at(d, "t_in"), "t_in");
  p.t_mid = json::flat(json::at(d, "t_mid"), "t_mid");
  p.calib_mean_abs = json::flat(json::at(d, "calib_mean_abs"), "calib_mean_abs");
  p.s_in = json::flat(json::at(d, "s_in"), "s_in");
  p.s_mid = json::flat(json::at(d, "s_mid"), "s_mid");
  p.target_sparsity = json::number(json::at(d, "target_sparsity"), "target_sparsity");
  const auto form = d.find("gated_mlp");  // absent in profiles older than the plain form: gated
  if (form != d.end()) {
    if (!form->is_boolean()) throw std::runtime_error("gated_mlp must be true or false, got " + form->dump());
    p.gated_mlp = form->get<bool>();
  }
  p.validate();
  return p;
}

// Errors name the file.
inline Profile load_profile(const std::string& path) {
  try {
    return profile_from_json(json::parse(json::read_file(path), path));
  } catch (const std::exception& e) {
    const std::string what = e.what();
    if (what.find(path) != std::string::npos) throw;  // already names it
    throw std::runtime_error(path + ": " + what);
  }
}

}  // namespace clada

#endif  // CLADA_PROFILE_READER_HPP
