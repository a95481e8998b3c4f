// One TensorRT engine and its execution context, header-only C++17 on TensorRT 10/11's API
// (IRuntime::deserializeCudaEngine, setInputShape, setTensorAddress, enqueueV3). Copy it
// into a service as is; clada_run.cpp is the generation loop that drives two of these.
//
// The engines are the ones `clada-export build` writes (prefill.engine, decode.engine);
// their inputs and outputs are named in clada_export/contract.py. Errors throw
// std::runtime_error with the tensor and the engine file named.
#ifndef CLADA_ENGINE_SESSION_HPP
#define CLADA_ENGINE_SESSION_HPP

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace clada {

// Warnings and errors to stderr; TensorRT's info messages are dropped.
class StderrLogger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline std::size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    default: throw std::runtime_error("unsupported tensor type in a clada engine");
  }
}

inline std::vector<int64_t> to_vector(const nvinfer1::Dims& d) { return {d.d, d.d + d.nbDims}; }

inline nvinfer1::Dims to_dims(const std::vector<int64_t>& v) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// Registers the SparseMLP plugin (libclada_trt_plugin.so, through its getCreators entry
// point) in the runtime's registry: needed before deserializing a decode engine built with
// the plugin. The library stays loaded for the runtime's lifetime.
inline void load_plugin_library(nvinfer1::IRuntime& runtime, const std::string& path) {
  if (runtime.getPluginRegistry().loadLibrary(path.c_str()) == nullptr)
    throw std::runtime_error("could not load the SparseMLP TensorRT plugin from " + path +
                             " (build plugins/tensorrt against this TensorRT)");
}

class EngineSession {
 public:
  EngineSession(nvinfer1::IRuntime& runtime, const std::string& path) : path_(path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path + " (build it with `clada-export build OUT`)");
    std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    engine_.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw std::runtime_error("TensorRT could not load " + path +
                               " (another TensorRT or GPU, or the plugin is not loaded; see the log)");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw std::runtime_error("could not create an execution context for " + path);
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? inputs_ : outputs_).push_back(name);
    }
  }

  const std::vector<std::string>& inputs() const { return inputs_; }
  const std::vector<std::string>& outputs() const { return outputs_; }
  const std::string& path() const { return path_; }

  bool has(const std::string& name) const {
    for (const auto* list : {&inputs_, &outputs_})
      for (const auto& n : *list)
        if (n == name) return true;
    return false;
  }

  nvinfer1::DataType dtype(const std::string& name) const { return engine_->getTensorDataType(name.c_str()); }

  // The engine's declared shape (-1 where dynamic).
  std::vector<int64_t> shape(const std::string& name) const {
    return to_vector(engine_->getTensorShape(name.c_str()));
  }

  // Input `name`'s bound in optimization profile 0: kMIN or kMAX.
  std::vector<int64_t> profile(const std::string& name, nvinfer1::OptProfileSelector which) const {
    return to_vector(engine_->getProfileShape(name.c_str(), 0, which));
  }

  void set_input_shape(const std::string& name, const std::vector<int64_t>& shape) {
    if (!context_->setInputShape(name.c_str(), to_dims(shape)))
      throw std::runtime_error(path_ + ": TensorRT refused the shape of " + name + " (outside the profile?)");
  }

  // Output shape for the input shapes set.
  std::vector<int64_t> output_shape(const std::string& name) const {
    return to_vector(context_->getTensorShape(name.c_str()));
  }

  void bind(const std::string& name, void* device_ptr) {
    if (!context_->setTensorAddress(name.c_str(), device_ptr))
      throw std::runtime_error(path_ + ": TensorRT refused the address of " + name);
  }

  void enqueue(cudaStream_t stream) {
    if (!context_->enqueueV3(stream)) throw std::runtime_error(path_ + ": enqueueV3 failed (see the log)");
  }

 private:
  std::string path_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<std::string> inputs_, outputs_;
};

// A device buffer freed with its owner.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    cuda_check(cudaMalloc(&ptr_, bytes ? bytes : 1), "cudaMalloc");
    cuda_check(cudaMemset(ptr_, 0, bytes ? bytes : 1), "cudaMemset");
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
  void* get() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace clada

#endif  // CLADA_ENGINE_SESSION_HPP
