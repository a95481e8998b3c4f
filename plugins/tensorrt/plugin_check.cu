// Checks libclada_trt_plugin.so the way TensorRT sees it, without TensorRT: loads the library,
// takes the creator from its getCreators() entry point, and drives the plugin's build and
// runtime interfaces by hand.
//   clada_trt_plugin_check <path/to/libclada_trt_plugin.so>          host checks (no GPU needed)
//   clada_trt_plugin_check <path/to/libclada_trt_plugin.so> --gpu    + enqueue against a host reference
// Both forms: the gated MLP (the default) and the plain one (field gated = 0, 6 inputs).
// Built with -DCLADA_TRT_BUILD_CHECK=ON. Exit status 0 when every check passes.
#include "NvInferRuntime.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                               \
            ++gFailures;                                                                                               \
        }                                                                                                              \
    } while (0)

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        last = msg;
        if (severity <= Severity::kWARNING)
        {
            std::printf("  [plugin log] %s\n", msg);
        }
    }
    std::string last;
};

class LoggerFinder : public ILoggerFinder
{
public:
    explicit LoggerFinder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

// getOutputShapes() copies x's expressions and never builds new ones.
class NullExprBuilder : public IExprBuilder
{
public:
    NullExprBuilder()
    {
        mImpl = nullptr;
    }
};

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

DynamicPluginTensorDesc dyn(std::vector<int64_t> const& shape, DataType type)
{
    DynamicPluginTensorDesc t{};
    t.desc.dims = dims(shape);
    t.desc.type = type;
    t.desc.format = TensorFormat::kLINEAR;
    t.min = t.opt = t.max = t.desc.dims;
    return t;
}

struct Plugin
{
    IPluginV3* base{nullptr};
    IPluginV3OneCore* core{nullptr};
    IPluginV3OneBuild* build{nullptr};
    IPluginV3OneRuntime* runtime{nullptr};
};

Plugin capabilities(IPluginV3* p)
{
    Plugin r;
    r.base = p;
    if (p)
    {
        r.core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
        r.build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        r.runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    }
    return r;
}

std::vector<DynamicPluginTensorDesc> io(int64_t B, int64_t T, int64_t H, int64_t I, DataType t)
{
    return {dyn({B, T, H}, t), dyn({H, I}, t), dyn({H, I}, t), dyn({I, H}, t), dyn({B, 2}, DataType::kFLOAT),
        dyn({B, T, H}, t)};
}

//! The plain form's inputs (x, w_in_t, b_in, w_out_t, b_out, thresholds) and output y.
std::vector<DynamicPluginTensorDesc> ioPlain(int64_t B, int64_t T, int64_t H, int64_t I, DataType t)
{
    return {dyn({B, T, H}, t), dyn({H, I}, t), dyn({I}, t), dyn({I, H}, t), dyn({H}, t), dyn({B, 2}, DataType::kFLOAT),
        dyn({B, T, H}, t)};
}

//! A plugin of the plain form (field gated = 0) with the given activation; null when refused.
IPluginV3* createPlain(IPluginCreatorV3One* creator, char const* act, TensorRTPhase phase, int32_t gated = 0)
{
    PluginField f[2] = {PluginField("activation", act, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(act) + 1)),
        PluginField("gated", &gated, PluginFieldType::kINT32, 1)};
    PluginFieldCollection fc{2, f};
    return creator->createPlugin("node", &fc, phase);
}

void plainHostChecks(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    Plugin p = capabilities(createPlain(creator, "gelu_tanh", TensorRTPhase::kBUILD));
    CHECK(p.base && p.core && p.build && p.runtime);
    if (!(p.base && p.core && p.build && p.runtime))
    {
        return;
    }
    CHECK(std::strcmp(p.build->getMetadataString(), "activation=gelu_tanh,gated=0") == 0);
    DataType const half = DataType::kHALF, bf16 = DataType::kBF16, f32 = DataType::kFLOAT;
    DataType in[6] = {bf16, bf16, bf16, bf16, bf16, f32}, out[1] = {f32};
    CHECK(p.build->getOutputDataTypes(out, 1, in, 6) == 0 && out[0] == bf16);
    CHECK(p.build->getOutputDataTypes(out, 1, in, 5) != 0); // the gated form's input count

    auto ok = [&](std::vector<DynamicPluginTensorDesc> v, int pos) {
        return p.build->supportsFormatCombination(pos, v.data(), 6, 1);
    };
    for (DataType t : {half, bf16})
    {
        auto v = ioPlain(2, 3, 64, 128, t);
        for (int pos = 0; pos < 7; ++pos)
        {
            CHECK(ok(v, pos));
        }
        v[5].desc.type = t; // thresholds must be float32
        CHECK(!ok(v, 5));
        v = ioPlain(2, 3, 64, 128, t);
        v[2].desc.type = f32; // b_in must match x
        CHECK(!ok(v, 2));
        v = ioPlain(2, 3, 64, 128, t);
        v[4].desc.type = t == half ? bf16 : half; // b_out must match x
        CHECK(!ok(v, 4));
        v = ioPlain(2, 3, 64, 128, t);
        v[6].desc.type = f32; // y must match x
        CHECK(!ok(v, 6));
    }
    auto gated = io(2, 3, 64, 128, half);
    CHECK(!p.build->supportsFormatCombination(0, gated.data(), 5, 1));

    // configurePlugin: GPT-2 small and OPT-125m's MLPs, then shapes the kernels cannot take
    {
        auto v = ioPlain(-1, -1, 768, 3072, half);
        CHECK(p.build->configurePlugin(v.data(), 6, v.data() + 6, 1) == 0);
        v = ioPlain(1, 1, 768, 3072, bf16);
        v[2].desc.dims = dims({768}); // b_in must be [I]
        CHECK(p.build->configurePlugin(v.data(), 6, v.data() + 6, 1) != 0);
        CHECK(logger.last.find("b_in") != std::string::npos);
        v = ioPlain(1, 1, 768, 3072, bf16);
        v[4].desc.dims = dims({1, 768}); // b_out must be [H]
        CHECK(p.build->configurePlugin(v.data(), 6, v.data() + 6, 1) != 0);
        v = ioPlain(1, 1, 768, 3072, bf16);
        v[3].desc.dims = dims({768, 3072}); // w_out_t must be [I, H]
        CHECK(p.build->configurePlugin(v.data(), 6, v.data() + 6, 1) != 0);
        v = ioPlain(1, 1, 772, 3072, bf16);
        CHECK(p.build->configurePlugin(v.data(), 6, v.data() + 6, 1) != 0);
        CHECK(logger.last.find("multiples of 8") != std::string::npos);
        CHECK(p.build->configurePlugin(gated.data(), 5, gated.data() + 5, 1) != 0);
        CHECK(logger.last.find("6 inputs") != std::string::npos);
    }
    {
        DimsExprs inputs[6]{};
        inputs[0].nbDims = 3;
        inputs[5].nbDims = 2;
        DimsExprs outputs[1]{};
        NullExprBuilder builder;
        CHECK(p.build->getOutputShapes(inputs, 6, nullptr, 0, outputs, 1, builder) == 0 && outputs[0].nbDims == 3);
    }
    {
        auto decode = ioPlain(8, 1, 768, 3072, half);
        CHECK(p.build->getWorkspaceSize(decode.data(), 6, decode.data() + 6, 1) > 0);
    }
    // Serialization round trip keeps the form and the activation (relu: OPT).
    for (char const* act : {"relu", "gelu", "gelu_tanh", "silu"})
    {
        Plugin q = capabilities(createPlain(creator, act, TensorRTPhase::kBUILD));
        CHECK(q.base != nullptr);
        if (!q.base)
        {
            continue;
        }
        std::string const expect = std::string("activation=") + act + ",gated=0";
        PluginFieldCollection const* saved = q.runtime->getFieldsToSerialize();
        Plugin r = capabilities(creator->createPlugin("node", saved, TensorRTPhase::kRUNTIME));
        CHECK(r.base != nullptr);
        if (r.base)
        {
            CHECK(std::string(r.build->getMetadataString()) == expect);
            Plugin c = capabilities(r.runtime->attachToContext(nullptr));
            CHECK(c.base && std::string(c.build->getMetadataString()) == expect);
            delete c.base;
            delete r.base;
        }
        delete q.base;
    }
    // gated = 1 spelled out is the gated form; any other value is refused
    {
        Plugin g = capabilities(createPlain(creator, "silu", TensorRTPhase::kBUILD, 1));
        CHECK(g.base && std::strcmp(g.build->getMetadataString(), "activation=silu") == 0);
        delete g.base;
        CHECK(createPlain(creator, "silu", TensorRTPhase::kBUILD, 2) == nullptr);
        CHECK(logger.last.find("gated") != std::string::npos);
    }
    delete p.base;
}

void hostChecks(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    CHECK(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    CHECK(std::strcmp(creator->getPluginName(), "SparseMLP") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    CHECK(names && names->nbFields == 2 && std::strcmp(names->fields[0].name, "activation") == 0
        && std::strcmp(names->fields[1].name, "gated") == 0);

    // The ONNX parser passes no field for a node without attributes.
    PluginFieldCollection empty{};
    Plugin p = capabilities(creator->createPlugin("node", &empty, TensorRTPhase::kBUILD));
    CHECK(p.base && p.core && p.build && p.runtime);
    if (!(p.base && p.core && p.build && p.runtime))
    {
        return;
    }
    CHECK(std::strcmp(p.core->getPluginName(), "SparseMLP") == 0);
    CHECK(std::strcmp(p.build->getMetadataString(), "activation=silu") == 0);
    CHECK(p.build->getNbOutputs() == 1);

    DataType const half = DataType::kHALF, bf16 = DataType::kBF16, f32 = DataType::kFLOAT;
    DataType in[5] = {half, half, half, half, f32}, out[1] = {f32};
    CHECK(p.build->getOutputDataTypes(out, 1, in, 5) == 0 && out[0] == half);
    in[0] = bf16;
    CHECK(p.build->getOutputDataTypes(out, 1, in, 5) == 0 && out[0] == bf16);

    // supportsFormatCombination, position by position
    auto ok = [&](std::vector<DynamicPluginTensorDesc> v, int pos) {
        return p.build->supportsFormatCombination(pos, v.data(), 5, 1);
    };
    for (DataType t : {half, bf16})
    {
        auto v = io(2, 3, 64, 128, t);
        for (int pos = 0; pos < 6; ++pos)
        {
            CHECK(ok(v, pos));
        }
        v[4].desc.type = half; // thresholds must be float32
        CHECK(!ok(v, 4));
        v = io(2, 3, 64, 128, t);
        v[1].desc.type = t == half ? bf16 : half; // weights must match x
        CHECK(!ok(v, 1));
        v = io(2, 3, 64, 128, t);
        v[5].desc.type = f32; // y must match x
        CHECK(!ok(v, 5));
        v = io(2, 3, 64, 128, t);
        v[0].desc.format = TensorFormat::kCHW2;
        CHECK(!ok(v, 0));
    }
    CHECK(!ok(io(2, 3, 64, 128, f32), 0)); // float32 x: not without a conversion
    CHECK(!ok(io(2, 3, 64, 128, DataType::kINT8), 0));

    // configurePlugin accepts the kernels' shapes and refuses the rest, naming them
    {
        auto v = io(-1, -1, 4096, 14336, half);
        CHECK(p.build->configurePlugin(v.data(), 5, v.data() + 5, 1) == 0);
        v = io(1, 1, 4100, 14336, half);
        v[0].desc.dims.d[2] = 4100;
        CHECK(p.build->configurePlugin(v.data(), 5, v.data() + 5, 1) != 0);
        CHECK(logger.last.find("multiples of 8") != std::string::npos);
        v = io(1, 1, 16384, 1024, half);
        CHECK(p.build->configurePlugin(v.data(), 5, v.data() + 5, 1) != 0);
        v = io(1, 1, 64, 128, half);
        v[3].desc.dims = dims({64, 128}); // w_down_t must be [I, H]
        CHECK(p.build->configurePlugin(v.data(), 5, v.data() + 5, 1) != 0);
    }

    // getOutputShapes: y has x's shape
    {
        DimsExprs inputs[5]{};
        inputs[0].nbDims = 3;
        inputs[4].nbDims = 2;
        for (int i = 1; i < 4; ++i)
        {
            inputs[i].nbDims = 2;
        }
        DimsExprs outputs[1]{};
        NullExprBuilder builder;
        CHECK(p.build->getOutputShapes(inputs, 5, nullptr, 0, outputs, 1, builder) == 0 && outputs[0].nbDims == 3);
    }

    // getWorkspaceSize grows with the profile's largest x and covers per-row thresholds
    {
        auto decode = io(8, 1, 4096, 14336, half);
        auto prefill = io(8, 2048, 4096, 14336, half);
        size_t const wsDecode = p.build->getWorkspaceSize(decode.data(), 5, decode.data() + 5, 1);
        size_t const wsPrefill = p.build->getWorkspaceSize(prefill.data(), 5, prefill.data() + 5, 1);
        std::printf("  workspace: decode [8,1,4096]x14336 %zu bytes, prefill [8,2048,4096] %zu bytes\n", wsDecode,
            wsPrefill);
        CHECK(wsDecode > 0 && wsPrefill >= wsDecode + 8 * 2048 * 2 * sizeof(float) - 256);
    }

    // Serialization round trip: the runtime plugin gets getFieldsToSerialize()'s fields.
    for (char const* act : {"silu", "gelu_tanh", "gelu", "relu"})
    {
        PluginField f("activation", act, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(act) + 1));
        PluginFieldCollection fc{1, &f};
        Plugin q = capabilities(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
        CHECK(q.base != nullptr);
        if (!q.base)
        {
            continue;
        }
        PluginFieldCollection const* saved = q.runtime->getFieldsToSerialize();
        Plugin r = capabilities(creator->createPlugin("node", saved, TensorRTPhase::kRUNTIME));
        CHECK(r.base != nullptr);
        if (r.base)
        {
            CHECK(std::string(r.build->getMetadataString()) == std::string("activation=") + act);
            Plugin c = capabilities(r.runtime->attachToContext(nullptr));
            CHECK(c.base && std::string(c.build->getMetadataString()) == std::string("activation=") + act);
            delete c.base;
            delete r.base;
        }
        delete q.base;
    }
    {
        PluginField f("activation", "swish", PluginFieldType::kCHAR, 6);
        PluginFieldCollection fc{1, &f};
        CHECK(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD) == nullptr);
        CHECK(logger.last.find("swish") != std::string::npos);
    }
    Plugin c = capabilities(p.base->clone());
    CHECK(c.base && std::strcmp(c.build->getMetadataString(), "activation=silu") == 0);
    delete c.base;
    delete p.base;
}

// ------------------------------------------------------------------ GPU: enqueue vs a host reference

template <typename T>
float toFloat(T v);
template <>
float toFloat(__half v)
{
    return __half2float(v);
}
template <>
float toFloat(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <typename T>
T fromFloat(float v);
template <>
__half fromFloat(float v)
{
    return __float2half_rn(v);
}
template <>
__nv_bfloat16 fromFloat(float v)
{
    return __float2bfloat16_rn(v);
}

#define CUDA_OK(expr)                                                                                                  \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t e_ = (expr);                                                                                       \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_));                   \
            ++gFailures;                                                                                               \
            return;                                                                                                    \
        }                                                                                                              \
    } while (0)

template <typename T>
void gpuCase(IPluginCreatorV3One* creator, DataType type, int64_t B, int64_t T_, int64_t H, int64_t I, uint32_t seed)
{
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    int64_t const rows = B * T_;
    std::vector<T> x(rows * H), wg(H * I), wu(H * I), wd(I * H);
    for (auto& v : x) v = fromFloat<T>(normal(rng));
    for (auto& v : wg) v = fromFloat<T>(normal(rng) * 0.05f);
    for (auto& v : wu) v = fromFloat<T>(normal(rng) * 0.05f);
    for (auto& v : wd) v = fromFloat<T>(normal(rng) * 0.05f);
    std::vector<float> thr(B * 2);
    for (int64_t b = 0; b < B; ++b)
    {
        // distinct per sequence; sequence 0 dense, so a mix-up of sequences shows
        thr[2 * b] = b == 0 ? 0.f : 0.2f * static_cast<float>(b);
        thr[2 * b + 1] = b == 0 ? 0.f : 0.02f * static_cast<float>(b);
    }
    // host reference (the kernels keep h in fp32)
    std::vector<float> ref(rows * H, 0.f), h(I);
    for (int64_t r = 0; r < rows; ++r)
    {
        float const tIn = thr[2 * (r / T_)], tMid = thr[2 * (r / T_) + 1];
        for (int64_t j = 0; j < I; ++j)
        {
            float g = 0.f, u = 0.f;
            for (int64_t i = 0; i < H; ++i)
            {
                float const xv = toFloat(x[r * H + i]);
                if (std::fabs(xv) > tIn)
                {
                    g += xv * toFloat(wg[i * I + j]);
                    u += xv * toFloat(wu[i * I + j]);
                }
            }
            float const hv = g / (1.f + std::exp(-g)) * u;
            h[j] = std::fabs(hv) > tMid ? hv : 0.f;
        }
        for (int64_t j = 0; j < I; ++j)
        {
            if (h[j] == 0.f) continue;
            for (int64_t c = 0; c < H; ++c)
            {
                ref[r * H + c] += h[j] * toFloat(wd[j * H + c]);
            }
        }
    }

    PluginFieldCollection empty{};
    Plugin p = capabilities(creator->createPlugin("node", &empty, TensorRTPhase::kRUNTIME));
    CHECK(p.base != nullptr);
    if (!p.base) return;
    auto v = io(B, T_, H, I, type);
    size_t const wsBytes = p.build->getWorkspaceSize(v.data(), 5, v.data() + 5, 1);
    void *dx, *dwg, *dwu, *dwd, *dthr, *dy, *dws;
    CUDA_OK(cudaMalloc(&dx, x.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dwg, wg.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dwu, wu.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dwd, wd.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dthr, thr.size() * sizeof(float)));
    CUDA_OK(cudaMalloc(&dy, x.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dws, wsBytes));
    CUDA_OK(cudaMemcpy(dx, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dwg, wg.data(), wg.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dwu, wu.data(), wu.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dwd, wd.data(), wd.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dthr, thr.data(), thr.size() * sizeof(float), cudaMemcpyHostToDevice));
    // TensorRT's workspace is scratch: start it dirty
    CUDA_OK(cudaMemset(dws, 0xAB, wsBytes));
    CUDA_OK(cudaMemset(dy, 0xFF, x.size() * sizeof(T)));
    PluginTensorDesc in[5] = {v[0].desc, v[1].desc, v[2].desc, v[3].desc, v[4].desc}, out[1] = {v[5].desc};
    void const* inputs[5] = {dx, dwg, dwu, dwd, dthr};
    void* outputs[1] = {dy};
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    CHECK(p.runtime->onShapeChange(in, 5, out, 1) == 0);
    // twice: the second run starts from the workspace state the first left
    for (int rep = 0; rep < 2; ++rep)
    {
        CHECK(p.runtime->enqueue(in, out, inputs, outputs, dws, stream) == 0);
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<T> y(x.size());
    CUDA_OK(cudaMemcpy(y.data(), dy, y.size() * sizeof(T), cudaMemcpyDeviceToHost));
    double maxErr = 0, maxRef = 0;
    for (size_t i = 0; i < y.size(); ++i)
    {
        maxErr = std::fmax(maxErr, std::fabs(toFloat(y[i]) - ref[i]));
        maxRef = std::fmax(maxRef, std::fabs(ref[i]));
    }
    double const tol = (type == DataType::kBF16 ? 1.6e-2 : 4e-3) * maxRef + 1e-3;
    std::printf("  enqueue %s B=%lld T=%lld H=%lld I=%lld (%lld chunk%s): max |y - ref| %.3g (max |ref| %.3g) %s\n",
        type == DataType::kBF16 ? "bf16" : "fp16", (long long) B, (long long) T_, (long long) H, (long long) I,
        (long long) ((rows + 7) / 8), rows > 8 ? "s" : "", maxErr, maxRef, maxErr <= tol ? "ok" : "FAIL");
    CHECK(maxErr <= tol);
    cudaStreamDestroy(stream);
    cudaFree(dx);
    cudaFree(dwg);
    cudaFree(dwu);
    cudaFree(dwd);
    cudaFree(dthr);
    cudaFree(dy);
    cudaFree(dws);
    delete p.base;
}

float hostActivation(float g, char const* act)
{
    if (std::strcmp(act, "relu") == 0)
    {
        return g > 0.f ? g : 0.f;
    }
    if (std::strcmp(act, "gelu_tanh") == 0)
    {
        return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
    if (std::strcmp(act, "gelu") == 0)
    {
        return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
    }
    return g / (1.f + std::exp(-g));
}

//! The plain form (gated = 0): y = act(x_s W_in + b_in)_s W_out + b_out, against a host reference.
template <typename T>
void gpuCasePlain(IPluginCreatorV3One* creator, DataType type, char const* act, int64_t B, int64_t T_, int64_t H,
    int64_t I, uint32_t seed)
{
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    int64_t const rows = B * T_;
    std::vector<T> x(rows * H), wi(H * I), bi(I), wo(I * H), bo(H);
    for (auto& v : x) v = fromFloat<T>(normal(rng));
    for (auto& v : wi) v = fromFloat<T>(normal(rng) * 0.05f);
    for (auto& v : bi) v = fromFloat<T>(normal(rng) * 0.1f);
    for (auto& v : wo) v = fromFloat<T>(normal(rng) * 0.05f);
    for (auto& v : bo) v = fromFloat<T>(normal(rng) * 0.1f);
    std::vector<float> thr(B * 2);
    for (int64_t b = 0; b < B; ++b)
    {
        thr[2 * b] = b == 0 ? 0.f : 0.2f * static_cast<float>(b);
        thr[2 * b + 1] = b == 0 ? 0.f : 0.05f * static_cast<float>(b);
    }
    std::vector<float> ref(rows * H, 0.f), h(I);
    for (int64_t r = 0; r < rows; ++r)
    {
        float const tIn = thr[2 * (r / T_)], tMid = thr[2 * (r / T_) + 1];
        for (int64_t j = 0; j < I; ++j)
        {
            float g = 0.f;
            for (int64_t i = 0; i < H; ++i)
            {
                float const xv = toFloat(x[r * H + i]);
                if (std::fabs(xv) > tIn)
                {
                    g += xv * toFloat(wi[i * I + j]);
                }
            }
            float const hv = hostActivation(g + toFloat(bi[j]), act);
            h[j] = std::fabs(hv) > tMid ? hv : 0.f;
        }
        for (int64_t c = 0; c < H; ++c)
        {
            ref[r * H + c] = toFloat(bo[c]);
        }
        for (int64_t j = 0; j < I; ++j)
        {
            if (h[j] == 0.f) continue;
            for (int64_t c = 0; c < H; ++c)
            {
                ref[r * H + c] += h[j] * toFloat(wo[j * H + c]);
            }
        }
    }

    Plugin p = capabilities(createPlain(creator, act, TensorRTPhase::kRUNTIME));
    CHECK(p.base != nullptr);
    if (!p.base) return;
    auto v = ioPlain(B, T_, H, I, type);
    size_t const wsBytes = p.build->getWorkspaceSize(v.data(), 6, v.data() + 6, 1);
    std::vector<std::pair<void const*, size_t>> host = {{x.data(), x.size() * sizeof(T)}, {wi.data(), wi.size() * sizeof(T)},
        {bi.data(), bi.size() * sizeof(T)}, {wo.data(), wo.size() * sizeof(T)}, {bo.data(), bo.size() * sizeof(T)},
        {thr.data(), thr.size() * sizeof(float)}};
    void* dev[6]{};
    void *dy, *dws;
    for (int k = 0; k < 6; ++k)
    {
        CUDA_OK(cudaMalloc(&dev[k], host[k].second));
        CUDA_OK(cudaMemcpy(dev[k], host[k].first, host[k].second, cudaMemcpyHostToDevice));
    }
    CUDA_OK(cudaMalloc(&dy, x.size() * sizeof(T)));
    CUDA_OK(cudaMalloc(&dws, wsBytes));
    CUDA_OK(cudaMemset(dws, 0xAB, wsBytes)); // TensorRT's workspace is scratch: start it dirty
    CUDA_OK(cudaMemset(dy, 0xFF, x.size() * sizeof(T)));
    PluginTensorDesc in[6], out[1] = {v[6].desc};
    for (int k = 0; k < 6; ++k)
    {
        in[k] = v[k].desc;
    }
    void const* inputs[6] = {dev[0], dev[1], dev[2], dev[3], dev[4], dev[5]};
    void* outputs[1] = {dy};
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    CHECK(p.runtime->onShapeChange(in, 6, out, 1) == 0);
    for (int rep = 0; rep < 2; ++rep)
    {
        CHECK(p.runtime->enqueue(in, out, inputs, outputs, dws, stream) == 0);
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<T> y(x.size());
    CUDA_OK(cudaMemcpy(y.data(), dy, y.size() * sizeof(T), cudaMemcpyDeviceToHost));
    double maxErr = 0, maxRef = 0;
    for (size_t i = 0; i < y.size(); ++i)
    {
        maxErr = std::fmax(maxErr, std::fabs(toFloat(y[i]) - ref[i]));
        maxRef = std::fmax(maxRef, std::fabs(ref[i]));
    }
    double const tol = (type == DataType::kBF16 ? 1.6e-2 : 4e-3) * maxRef + 1e-3;
    std::printf("  enqueue plain %s %s B=%lld T=%lld H=%lld I=%lld: max |y - ref| %.3g (max |ref| %.3g) %s\n",
        type == DataType::kBF16 ? "bf16" : "fp16", act, (long long) B, (long long) T_, (long long) H, (long long) I,
        maxErr, maxRef, maxErr <= tol ? "ok" : "FAIL");
    CHECK(maxErr <= tol);
    cudaStreamDestroy(stream);
    for (void* d : dev)
    {
        cudaFree(d);
    }
    cudaFree(dy);
    cudaFree(dws);
    delete p.base;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::printf("usage: %s path/to/libclada_trt_plugin.so [--gpu]\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib)
    {
        std::printf("FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    CHECK(getCreators != nullptr);
    CHECK(setLoggerFinder != nullptr);
    if (!getCreators || !setLoggerFinder)
    {
        return 1;
    }
    CapturingLogger logger;
    LoggerFinder finder(&logger);
    setLoggerFinder(&finder);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 1 && creators && creators[0]);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    std::printf("host checks\n");
    hostChecks(creator, logger);
    std::printf("host checks, plain form (gated = 0)\n");
    plainHostChecks(creator, logger);
    if (argc > 2 && std::strcmp(argv[2], "--gpu") == 0)
    {
        std::printf("GPU checks\n");
        struct Case
        {
            int64_t B, T;
        };
        // decode (1 call), then prefill shapes: several chunks, chunks spanning sequences, a tail
        for (Case c : {Case{1, 1}, Case{4, 1}, Case{8, 1}, Case{2, 3}, Case{3, 7}, Case{2, 13}})
        {
            gpuCase<__half>(creator, DataType::kHALF, c.B, c.T, 256, 512, 1234u + static_cast<uint32_t>(c.B * 31 + c.T));
            gpuCase<__nv_bfloat16>(creator, DataType::kBF16, c.B, c.T, 256, 512, 99u + static_cast<uint32_t>(c.B * 7 + c.T));
        }
        gpuCase<__half>(creator, DataType::kHALF, 1, 1, 4096, 14336, 7u); // Llama-3-8B MLP, decode
        // the plain form: decode and chunked prefill, each activation, GPT-2 small's MLP
        gpuCasePlain<__half>(creator, DataType::kHALF, "gelu_tanh", 1, 1, 256, 512, 11u);
        gpuCasePlain<__nv_bfloat16>(creator, DataType::kBF16, "relu", 4, 1, 256, 512, 12u);
        gpuCasePlain<__nv_bfloat16>(creator, DataType::kBF16, "gelu", 3, 7, 256, 512, 13u);
        gpuCasePlain<__half>(creator, DataType::kHALF, "silu", 2, 13, 256, 512, 14u);
        gpuCasePlain<__nv_bfloat16>(creator, DataType::kBF16, "gelu_tanh", 1, 1, 768, 3072, 15u);
    }
    std::printf(gFailures ? "%d check(s) failed\n" : "all checks passed\n", gFailures);
    return gFailures ? 1 : 0;
}
