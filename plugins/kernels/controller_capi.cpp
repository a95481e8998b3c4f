// C ABI over clada::ThresholdController (controller_capi.h). Host code only: it is in the
// kernel library because that is what the GPU runtime already loads.
#include "controller_capi.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>

#include "clada/controller.hpp"

struct clada_controller {
  clada::ThresholdController ctl;
};

namespace {

void copy_record(const clada::StepRecord& r, clada_controller_record* out) {
  out->step = r.step;
  out->token = r.token;
  out->seq = r.seq;
  out->has_token = r.has_token;
  out->has_load = r.has_load;
  out->state = static_cast<int32_t>(r.state);
  out->surprisal = r.surprisal;
  out->entropy = r.entropy;
  out->load = r.load;
  out->target = r.target;
  out->realized = r.realized;
  out->debt = r.debt;
  out->t_in_mean = r.t_in_mean;
  out->t_mid_mean = r.t_mid_mean;
}

}  // namespace

extern "C" {

clada_controller* clada_controller_create(int layers, int num_levels, const double* levels, const double* t_in,
                                          const double* t_mid, const double* calib_mean_abs, const double* s_in,
                                          const double* s_mid, double target_sparsity, int gated_mlp,
                                          const clada_controller_config* config, int batch, char* error,
                                          size_t error_len) {
  try {
    if (layers < 1 || num_levels < 2 || !levels || !t_in || !t_mid || !calib_mean_abs || !s_in || !s_mid || !config)
      throw std::invalid_argument("controller: missing profile arrays or config");
    const size_t L = static_cast<size_t>(layers), S = static_cast<size_t>(num_levels);
    clada::Profile p;
    p.num_layers = layers;
    p.num_levels = num_levels;
    p.levels.assign(levels, levels + S);
    p.t_in.assign(t_in, t_in + L * S);
    p.t_mid.assign(t_mid, t_mid + L * S);
    p.calib_mean_abs.assign(calib_mean_abs, calib_mean_abs + L * 2);
    p.s_in.assign(s_in, s_in + L);
    p.s_mid.assign(s_mid, s_mid + L);
    p.target_sparsity = target_sparsity;
    p.gated_mlp = gated_mlp != 0;
    clada::ControllerConfig c;
    c.window = config->window;
    c.min_history = config->min_history;
    c.easy_steps = config->easy_steps;
    c.payback_steps = config->payback_steps;
    c.high = config->high;
    c.high_margin = config->high_margin;
    c.low = config->low;
    c.low_margin = config->low_margin;
    c.dense_offset = config->dense_offset;
    c.sparse_offset = config->sparse_offset;
    c.max_correction = config->max_correction;
    c.scale_min = config->scale_min;
    c.scale_max = config->scale_max;
    c.prefix_strength = config->prefix_strength;
    if (config->has_min_sparsity) c.min_sparsity = config->min_sparsity;
    if (config->has_max_sparsity) c.max_sparsity = config->max_sparsity;
    if (config->has_target) c.target = config->target;
    return new clada_controller{clada::ThresholdController(std::move(p), c, batch)};
  } catch (const std::exception& e) {
    if (error && error_len) std::snprintf(error, error_len, "%s", e.what());
  } catch (...) {
    if (error && error_len) std::snprintf(error, error_len, "unknown error");
  }
  return nullptr;
}

void clada_controller_destroy(clada_controller* c) { delete c; }

int clada_controller_targets(const clada_controller* c, double* target, double* min_sparsity,
                             double* max_sparsity) {
  if (!c || !target || !min_sparsity || !max_sparsity) return -1;
  *target = c->ctl.target();
  *min_sparsity = c->ctl.min_sparsity();
  *max_sparsity = c->ctl.max_sparsity();
  return 0;
}

int clada_controller_begin(clada_controller* c, const double* act_stats, float* out) {
  if (!c || !out) return -1;
  c->ctl.begin(act_stats, out);
  return 0;
}

int clada_controller_step(clada_controller* c, const double* surprisal, const double* entropy,
                          const int64_t* tokens, const uint8_t* active, float* out, clada_controller_record* records) {
  if (!c || !surprisal || !entropy || !out || !records) return -1;
  static_assert(sizeof(std::int64_t) == sizeof(int64_t), "int64_t");
  c->ctl.step(surprisal, entropy, tokens, active, out);
  for (int b = 0; b < c->ctl.batch(); ++b)
    if (!active || active[b]) copy_record(c->ctl.last_record(b), records + b);
  return 0;
}

int clada_controller_stats(const clada_controller* c, double* mean_sparsity, int64_t* steps, int64_t* denser,
                           int64_t* sparser) {
  if (!c || !mean_sparsity || !steps || !denser || !sparser) return -1;
  for (int b = 0; b < c->ctl.batch(); ++b) {
    mean_sparsity[b] = c->ctl.mean_sparsity(b);
    steps[b] = c->ctl.steps(b);
    denser[b] = c->ctl.denser_steps(b);
    sparser[b] = c->ctl.sparser_steps(b);
  }
  return 0;
}

}  // extern "C"
