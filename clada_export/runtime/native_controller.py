"""The C++ threshold controller (runtime/include/clada/controller.hpp) in the Python
decode loop, through the kernel library's C ABI (plugins/kernels/controller_capi.h).

The GPU runtime runs the controller between two CUDA-graph replays, so its host time is
step time: the Python controller costs 100-450 us a step on the lent H200's host (batch 1-8),
several percent of a decode step. The C++ controller makes the same decisions bit for bit
(tests/test_native_controller.py holds the two together on random profiles and signals,
as the trace-replay tests do) in a few microseconds. The wrapper keeps its own share small
too: pointers converted once, decisions built only when read (:meth:`NativeController.step_summary`
gives the generator what it records per step): 9 / 12 / 16 us a step at batch 1 / 4 / 8 on
the 2-core CI machine, 37 / 60 / 99 us before.

:class:`NativeController` has the surface the :class:`~clada_export.runtime.generator.Generator`
and the benchmark use (``begin``, ``step``, ``last_decisions``, ``mean_sparsity`` and the step
counts, ``close``/``abort``); traces are the Python controller's job: :func:`make_controller`
picks the native one only where no trace is asked for and the library is loaded.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np

from clada_export.errors import UserError
from clada_export.profile import SparsityProfile
from clada_export.runtime.controller import DENSER, STATE_NAMES, ControllerConfig, Decision, ThresholdController


class _Config(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("window", "min_history", "easy_steps", "payback_steps")] + [
        (n, ctypes.c_double) for n in ("high", "high_margin", "low", "low_margin", "dense_offset", "sparse_offset",
                                       "max_correction", "scale_min", "scale_max", "prefix_strength")] + [
        (n, ctypes.c_int) for n in ("has_min_sparsity", "has_max_sparsity", "has_target")] + [
        (n, ctypes.c_double) for n in ("min_sparsity", "max_sparsity", "target")]


# clada_controller_record, read back as one structured array (tolist() is one call for the batch)
_RECORD = np.dtype([("step", np.int64), ("token", np.int64)] + [
    (n, np.int32) for n in ("seq", "has_token", "has_load", "state")] + [
    (n, np.float64) for n in ("surprisal", "entropy", "load", "target", "realized", "debt", "t_in_mean",
                              "t_mid_mean")], align=True)


_bound: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    """The kernel library with the controller's signatures declared (NativeKernelsUnavailable if absent)."""
    global _bound
    if _bound is None:
        from clada_export.ops.native import load_library

        lib = load_library()
        P, D = ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)
        lib.clada_controller_create.restype = P
        lib.clada_controller_create.argtypes = [ctypes.c_int, ctypes.c_int] + [D] * 6 + [
            ctypes.c_double, ctypes.c_int, ctypes.POINTER(_Config), ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.clada_controller_destroy.restype = None
        lib.clada_controller_destroy.argtypes = [P]
        lib.clada_controller_targets.restype = ctypes.c_int
        lib.clada_controller_targets.argtypes = [P, D, D, D]
        lib.clada_controller_begin.restype = ctypes.c_int
        lib.clada_controller_begin.argtypes = [P, P, P]
        lib.clada_controller_step.restype = ctypes.c_int
        lib.clada_controller_step.argtypes = [P] * 7
        lib.clada_controller_stats.restype = ctypes.c_int
        lib.clada_controller_stats.argtypes = [P] * 5
        _bound = lib
    return _bound


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class NativeController:
    """:class:`~clada_export.runtime.controller.ThresholdController`'s decisions from the C++
    controller (no trace). Arguments and returned arrays as there."""

    def __init__(self, profile: SparsityProfile, config: ControllerConfig | None = None, batch: int = 1):
        self.config = config if config is not None else ControllerConfig()
        self.config.validate()
        # the Python controller's own checks (and messages) on the profile and bounds
        ThresholdController(profile, self.config, batch=batch)
        self.profile, self.batch, self.L = profile, int(batch), int(profile.num_layers)
        lib = _library()
        c = self.config
        cfg = _Config(window=c.window, min_history=c.min_history, easy_steps=c.easy_steps,
                      payback_steps=c.payback_steps, high=c.high, high_margin=c.high_margin, low=c.low,
                      low_margin=c.low_margin, dense_offset=c.dense_offset, sparse_offset=c.sparse_offset,
                      max_correction=c.max_correction, scale_min=c.scale_min, scale_max=c.scale_max,
                      prefix_strength=c.prefix_strength, has_min_sparsity=c.min_sparsity is not None,
                      has_max_sparsity=c.max_sparsity is not None, has_target=c.target is not None,
                      min_sparsity=c.min_sparsity or 0.0, max_sparsity=c.max_sparsity or 0.0,
                      target=c.target or 0.0)
        arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (profile.levels, profile.t_in, profile.t_mid,
                                                                       profile.calib_mean_abs, profile.s_in,
                                                                       profile.s_mid)]
        self._keep = arrays
        err = ctypes.create_string_buffer(512)
        D = ctypes.POINTER(ctypes.c_double)
        handle = lib.clada_controller_create(self.L, len(arrays[0]), *[a.ctypes.data_as(D) for a in arrays],
                                             float(profile.target_sparsity), int(bool(profile.gated_mlp)),
                                             ctypes.byref(cfg), self.batch, err,
                                             len(err))
        if not handle:
            raise UserError(f"the C++ controller refused this profile or config: {err.value.decode()}")
        self._lib, self._h = lib, ctypes.c_void_p(handle)
        t, lo, hi = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        lib.clada_controller_targets(self._h, ctypes.byref(t), ctypes.byref(lo), ctypes.byref(hi))
        self.target, self.min_sparsity, self.max_sparsity = t.value, lo.value, hi.value
        B = self.batch
        self._out = np.zeros((self.L, B, 2), np.float32)
        self._records = np.zeros(B, _RECORD)
        self._u, self._e = np.zeros(B), np.zeros(B)
        self._tok, self._act = np.zeros(B, np.int64), np.ones(B, np.uint8)
        # The step's pointers, converted once: each `.ctypes.data` is a few microseconds, and a
        # step's host time is decode time (the GPU waits for the next thresholds).
        ptr = ctypes.c_void_p
        self._step_args = [self._h, ptr(_ptr(self._u)), ptr(_ptr(self._e)), ptr(_ptr(self._tok)),
                           ptr(_ptr(self._act)), ptr(_ptr(self._out)), ptr(_ptr(self._records))]
        self._step_args_no_tokens = list(self._step_args)
        self._step_args_no_tokens[3] = None
        self._step_fn = lib.clada_controller_step
        self._step_index = 0
        self._decisions: list[Decision | None] | None = [None] * B

    def begin(self, act_stats: np.ndarray | None = None) -> np.ndarray:
        stats = None
        if act_stats is not None:
            stats = np.ascontiguousarray(act_stats, dtype=np.float64)
            if stats.shape != (self.L, self.batch, 2):
                raise ValueError(f"act_stats must have shape [{self.L}, {self.batch}, 2], got {list(stats.shape)}")
        self._lib.clada_controller_begin(self._h, None if stats is None else _ptr(stats), _ptr(self._out))
        self._step_index = 0
        self._decisions = [None] * self.batch
        return self._out.copy()

    def step(self, surprisal: np.ndarray, entropy: np.ndarray, tokens: np.ndarray | Sequence[int] | None = None,
             active: np.ndarray | Sequence[bool] | None = None) -> np.ndarray:
        self._u[:] = surprisal
        self._e[:] = entropy
        if tokens is not None:
            self._tok[:] = tokens
        self._act[:] = True if active is None else active
        if not self._h:  # the cached arguments hold the handle: never pass a destroyed one
            raise RuntimeError("this controller was closed")
        self._step_fn(*(self._step_args_no_tokens if tokens is None else self._step_args))
        self._decisions = None  # built from the records when asked for (last_decisions)
        self._step_index += 1
        return self._out.copy()

    @property
    def last_decisions(self) -> list[Decision | None]:
        """The last step's decisions (None for inactive sequences), as the Python controller's."""
        if self._decisions is None:
            self._decisions = [
                Decision(step=r[0], seq=r[2], token=r[1] if r[3] else None, surprisal=r[6], entropy=r[7],
                         load=r[8] if r[4] else None, state=STATE_NAMES[r[5]], target=r[9], realized=r[10],
                         debt=r[11], t_in_mean=r[12], t_mid_mean=r[13]) if act else None
                for r, act in zip(self._records.tolist(), self._act.tolist())]
        return self._decisions

    def step_summary(self) -> tuple[np.ndarray, np.ndarray]:
        """The last step's realized byte sparsity ``float64 [B]`` (NaN where inactive) and
        whether each sequence is `denser` ``bool [B]``, without building decisions."""
        active = self._act.astype(bool)
        realized = np.where(active, self._records["realized"], np.nan)
        return realized, active & (self._records["state"] == DENSER)

    def _stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        B = self.batch
        mean, steps, denser, sparser = np.zeros(B), np.zeros(B, np.int64), np.zeros(B, np.int64), np.zeros(B, np.int64)
        self._lib.clada_controller_stats(self._h, _ptr(mean), _ptr(steps), _ptr(denser), _ptr(sparser))
        return mean, steps, denser, sparser

    @property
    def mean_sparsity(self) -> np.ndarray:
        return self._stats()[0]

    @property
    def steps(self) -> np.ndarray:
        return self._stats()[1]

    @property
    def denser_steps(self) -> np.ndarray:
        return self._stats()[2]

    @property
    def sparser_steps(self) -> np.ndarray:
        return self._stats()[3]

    def close(self) -> None:
        if self._h:
            self._lib.clada_controller_destroy(self._h)
            self._h = ctypes.c_void_p()

    abort = close

    def __del__(self) -> None:
        if getattr(self, "_h", None):
            self.close()


def native_controller_available() -> str | None:
    """None when the C++ controller can be loaded, else why not."""
    from clada_export.ops.native import NativeKernelsUnavailable

    try:
        _library()
    except NativeKernelsUnavailable as e:
        return str(e)
    return None


def make_controller(profile: SparsityProfile, config: ControllerConfig | None = None, batch: int = 1,
                    trace: str | os.PathLike | None = None,
                    native: bool | None = None) -> ThresholdController | NativeController:
    """The controller a decode loop runs: the C++ one (``native=True``, or ``None`` where the
    kernel library loads and no trace is asked for), else the Python one (which writes traces)."""
    if native is None:
        native = trace is None and native_controller_available() is None
    if native:
        if trace is not None:
            raise UserError("traces are written by the Python controller; drop --trace or the native controller")
        return NativeController(profile, config, batch=batch)
    return ThresholdController(profile, config, batch=batch, trace=trace)


__all__ = ["NativeController", "make_controller", "native_controller_available"]
