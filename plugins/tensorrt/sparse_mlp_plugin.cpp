#include "sparse_mlp_plugin.h"

#include "row_thresholds.h"
#include "sparse_mlp.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>

using namespace nvinfer1;

namespace clada::trt
{
namespace
{

// ------------------------------------------------------------------ logging

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

std::string const kLogPrefix = "clada SparseMLP plugin: ";

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

// ------------------------------------------------------------------ activations

struct ActivationName
{
    int32_t value;
    char const* name;
};

constexpr ActivationName kActivations[] = {
    {CLADA_ACT_SILU, "silu"},
    {CLADA_ACT_GELU_TANH, "gelu_tanh"},
    {CLADA_ACT_GELU, "gelu"},
    {CLADA_ACT_RELU, "relu"},
};

constexpr char kActivationNames[] = "silu, gelu_tanh, gelu, relu";

char const* activationName(int32_t value)
{
    for (auto const& a : kActivations)
    {
        if (a.value == value)
        {
            return a.name;
        }
    }
    return nullptr;
}

//! -1 for an unknown name.
int32_t activationFromName(std::string const& name)
{
    for (auto const& a : kActivations)
    {
        if (name == a.name)
        {
            return a.value;
        }
    }
    return -1;
}

// ------------------------------------------------------------------ shapes

//! Rows of a [..., H] activation: the product of every dimension but the last (-1 if unknown).
int64_t rowsOf(Dims const& d)
{
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
    {
        if (d.d[i] < 0)
        {
            return -1;
        }
        rows *= d.d[i];
    }
    return rows;
}

bool isHalfType(DataType t)
{
    return t == DataType::kHALF || t == DataType::kBF16;
}

size_t alignUp(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

// Workspace: [kernel workspace for min(rows, 8) rows | per-row thresholds, rows x 2 floats].
// The per-row part is used only when a sequence has more than one token (T > 1).
constexpr size_t kWorkspaceAlign = 256;

size_t kernelWorkspaceBytes(int64_t rows, int32_t hidden, int32_t inter)
{
    int32_t const batch
        = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(rows, 1), CLADA_SPARSE_MLP_MAX_BATCH));
    return alignUp(clada_sparse_mlp_workspace_size(batch, hidden, inter), kWorkspaceAlign);
}

size_t rowThresholdBytes(int64_t rows)
{
    return alignUp(static_cast<size_t>(std::max<int64_t>(rows, 0)) * 2 * sizeof(float), kWorkspaceAlign);
}

std::string dimsToString(Dims const& d)
{
    std::ostringstream s;
    s << "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s << (i ? ", " : "") << d.d[i];
    }
    s << "]";
    return s.str();
}

} // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder == nullptr && finder != nullptr)
    {
        gLoggerFinder = finder;
    }
}

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        ILogger* logger{nullptr};
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
        }
        std::string const text = kLogPrefix + message;
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            std::cerr << text << std::endl;
        }
    }
    catch (...)
    {
    }
}

// ================================================================== SparseMLPPlugin

SparseMLPPlugin::SparseMLPPlugin(int32_t activation, bool gated)
    : mActivation(activation)
    , mGated(gated)
    , mGatedField(gated ? 1 : 0)
{
    char const* name = activationName(activation);
    mActivationName = name ? name : "silu";
    // The gated form keeps the identifiers it had before the plain form existed.
    mTimingCacheId = std::string(kSparseMLPPluginName) + "/" + kSparseMLPPluginVersion + "/" + mActivationName
        + (gated ? "" : "/plain");
    mMetadata = std::string("activation=") + mActivationName + (gated ? "" : ",gated=0");
    initFieldsToSerialize();
}

SparseMLPPlugin::SparseMLPPlugin(SparseMLPPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mActivation(other.mActivation)
    , mGated(other.mGated)
    , mGatedField(other.mGatedField)
    , mActivationName(other.mActivationName)
    , mTimingCacheId(other.mTimingCacheId)
    , mMetadata(other.mMetadata)
{
    // The field collection points into this object's strings, never the other's.
    initFieldsToSerialize();
}

void SparseMLPPlugin::initFieldsToSerialize()
{
    mFieldsToSerialize.clear();
    // The string with its terminator, as the ONNX parser passes string attributes.
    mFieldsToSerialize.emplace_back(kActivationField, mActivationName.c_str(), PluginFieldType::kCHAR,
        static_cast<int32_t>(mActivationName.size() + 1));
    mFieldsToSerialize.emplace_back(kGatedField, &mGatedField, PluginFieldType::kINT32, 1);
    mFCToSerialize.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
    mFCToSerialize.fields = mFieldsToSerialize.data();
}

IPluginCapability* SparseMLPPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* SparseMLPPlugin::clone() noexcept
{
    try
    {
        return new SparseMLPPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* SparseMLPPlugin::getPluginName() const noexcept
{
    return kSparseMLPPluginName;
}

char const* SparseMLPPlugin::getPluginVersion() const noexcept
{
    return kSparseMLPPluginVersion;
}

char const* SparseMLPPlugin::getPluginNamespace() const noexcept
{
    return kSparseMLPPluginNamespace;
}

int32_t SparseMLPPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t SparseMLPPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    // Shapes the kernels cannot take fail here, at build time, with a message naming them,
    // rather than at the first enqueue. Weight shapes are static (initializers).
    if (nbInputs != this->nbInputs() || nbOutputs != kNbOutputs)
    {
        logError(mGated ? "expects 5 inputs (x, w_gate_t, w_up_t, w_down_t, thresholds) and 1 output (the plain "
                          "form, attribute gated=0, takes 6: x, w_in_t, b_in, w_out_t, b_out, thresholds)"
                        : "gated=0 expects 6 inputs (x, w_in_t, b_in, w_out_t, b_out, thresholds) and 1 output");
        return -1;
    }
    Dims const& x = in[kX].desc.dims;
    Dims const& w1 = in[1].desc.dims; // w_gate_t or w_in_t: [H, I]
    Dims const& thr = in[thresholdsIndex()].desc.dims;
    std::ostringstream shapes;
    bool wellFormed = x.nbDims >= 2 && w1.nbDims == 2 && thr.nbDims == 2;
    int64_t const hidden = w1.nbDims == 2 ? w1.d[0] : -1;
    int64_t const inter = w1.nbDims == 2 ? w1.d[1] : -1;
    bool consistent = hidden > 0 && inter > 0 && x.nbDims >= 1 && (x.d[x.nbDims - 1] < 0 || x.d[x.nbDims - 1] == hidden)
        && (thr.nbDims < 2 || thr.d[1] < 0 || thr.d[1] == 2);
    if (mGated)
    {
        Dims const& wu = in[kWUp].desc.dims;
        Dims const& wd = in[kWDown].desc.dims;
        shapes << "x " << dimsToString(x) << ", w_gate_t " << dimsToString(w1) << ", w_up_t " << dimsToString(wu)
               << ", w_down_t " << dimsToString(wd) << ", thresholds " << dimsToString(thr);
        wellFormed = wellFormed && wu.nbDims == 2 && wd.nbDims == 2;
        consistent = consistent && wellFormed && wu.d[0] == hidden && wu.d[1] == inter && wd.d[0] == inter
            && wd.d[1] == hidden;
    }
    else
    {
        Dims const& bIn = in[kBIn].desc.dims;
        Dims const& wOut = in[kWOut].desc.dims;
        Dims const& bOut = in[kBOut].desc.dims;
        shapes << "x " << dimsToString(x) << ", w_in_t " << dimsToString(w1) << ", b_in " << dimsToString(bIn)
               << ", w_out_t " << dimsToString(wOut) << ", b_out " << dimsToString(bOut) << ", thresholds "
               << dimsToString(thr);
        wellFormed = wellFormed && bIn.nbDims == 1 && wOut.nbDims == 2 && bOut.nbDims == 1;
        consistent = consistent && wellFormed && bIn.d[0] == inter && wOut.d[0] == inter && wOut.d[1] == hidden
            && bOut.d[0] == hidden;
    }
    if (!wellFormed)
    {
        logError(std::string(mGated
                     ? "expects x [..., H], w_gate_t [H, I], w_up_t [H, I], w_down_t [I, H], thresholds [B, 2]; got "
                     : "gated=0 expects x [..., H], w_in_t [H, I], b_in [I], w_out_t [I, H], b_out [H], "
                       "thresholds [B, 2]; got ")
            + shapes.str());
        return -1;
    }
    if (!consistent)
    {
        logError("inconsistent shapes: " + shapes.str());
        return -1;
    }
    if (hidden % 8 != 0 || inter % 8 != 0 || hidden > CLADA_SPARSE_MLP_MAX_HIDDEN)
    {
        std::ostringstream s;
        s << "the kernels need hidden and intermediate sizes that are multiples of 8 and hidden <= "
          << CLADA_SPARSE_MLP_MAX_HIDDEN << "; got hidden " << hidden << ", intermediate " << inter
          << " (build this graph from its function-body variant <graph>.onnx instead)";
        logError(s.str());
        return -1;
    }
    return 0;
}

int32_t SparseMLPPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs != this->nbInputs())
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kX];
    if (!isHalfType(inputTypes[kX]))
    {
        // supportsFormatCombination() will then offer TensorRT nothing; say why first.
        logMessage(ILogger::Severity::kWARNING,
            "x is not float16/bfloat16: the kernels take float16 or bfloat16 activations and weights "
            "(export with --dtype float16, or cast x and the weights around the node), or build from the "
            "function-body variant <graph>.onnx without this plugin loaded");
    }
    return 0;
}

int32_t SparseMLPPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != kNbOutputs || inputs[kX].nbDims < 2
        || inputs[thresholdsIndex()].nbDims != 2)
    {
        logError(std::string("expects x [..., H] and thresholds [B, 2] as input ") + std::to_string(thresholdsIndex())
            + " (" + std::to_string(this->nbInputs()) + " inputs for gated=" + (mGated ? "1" : "0") + ")");
        return -1;
    }
    // y has x's shape: [B, T, H] in, [B, T, H] out (w_down_t / w_out_t is [I, H]).
    outputs[0] = inputs[kX];
    return 0;
}

bool SparseMLPPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    int32_t const n = this->nbInputs();
    if (nbInputs != n || nbOutputs != kNbOutputs || pos < 0 || pos >= n + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false; // row-major, contiguous: what the kernels index
    }
    if (pos == kX)
    {
        return isHalfType(desc.type); // float16 or bfloat16
    }
    if (pos == thresholdsIndex())
    {
        return desc.type == DataType::kFLOAT; // (t_in, t_mid) pairs in fp32
    }
    // weights, biases (plain form) and y: the kernels take one element type, x's
    return desc.type == inOut[kX].desc.type;
}

size_t SparseMLPPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != this->nbInputs())
    {
        return 0;
    }
    // Sized for the profile's largest x; enough for any smaller one. Input 1 (w_gate_t or
    // w_in_t) is [H, I] in both forms.
    int64_t const rows = rowsOf(inputs[kX].max);
    int32_t const hidden = static_cast<int32_t>(inputs[kWGate].max.d[0]);
    int32_t const inter = static_cast<int32_t>(inputs[kWGate].max.d[1]);
    if (rows < 0 || hidden <= 0 || inter <= 0)
    {
        return 0;
    }
    return kernelWorkspaceBytes(rows, hidden, inter) + rowThresholdBytes(rows);
}

char const* SparseMLPPlugin::getTimingCacheID() noexcept
{
    return mTimingCacheId.c_str();
}

char const* SparseMLPPlugin::getMetadataString() noexcept
{
    return mMetadata.c_str();
}

int32_t SparseMLPPlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t /*nbInputs*/, PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept
{
    return 0; // nothing is cached per shape: enqueue reads the shapes it is given
}

int32_t SparseMLPPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& xDims = inputDesc[kX].dims;
    int64_t const rows = rowsOf(xDims);
    int32_t const thrIndex = thresholdsIndex();
    int64_t const seqs = inputDesc[thrIndex].dims.d[0];
    int32_t const hidden = static_cast<int32_t>(inputDesc[kWGate].dims.d[0]);
    int32_t const inter = static_cast<int32_t>(inputDesc[kWGate].dims.d[1]);
    if (rows == 0)
    {
        return 0; // an empty batch: nothing to compute
    }
    if (rows < 0 || seqs <= 0 || rows % seqs != 0 || xDims.d[xDims.nbDims - 1] != hidden)
    {
        logError("x " + dimsToString(xDims) + " does not split into thresholds' "
            + dimsToString(inputDesc[thrIndex].dims) + " sequences of hidden size " + std::to_string(hidden));
        return -1;
    }
    DataType const type = inputDesc[kX].type;
    if (!isHalfType(type) || outputDesc[0].type != type)
    {
        logError("x and y must be float16 or bfloat16");
        return -1;
    }
    int32_t const dtype = type == DataType::kHALF ? CLADA_DTYPE_F16 : CLADA_DTYPE_BF16;
    size_t const rowBytes = static_cast<size_t>(hidden) * 2; // both types are 2 bytes
    int64_t const tokensPerSeq = rows / seqs;

    auto* ws = static_cast<char*>(workspace);
    size_t const kernelWs = kernelWorkspaceBytes(rows, hidden, inter);
    auto const* thresholds = static_cast<float const*>(inputs[thrIndex]);
    if (tokensPerSeq > 1)
    {
        // The kernels read one (t_in, t_mid) pair per row; x is [B, T, H], so row r belongs to
        // sequence r / T. Expand [B, 2] to [B*T, 2] once for all chunks.
        auto* rowThresholds = reinterpret_cast<float*>(ws + kernelWs);
        cudaError_t const err = expandRowThresholds(thresholds, rowThresholds, seqs, tokensPerSeq, stream);
        if (err != cudaSuccess)
        {
            logError(std::string("threshold expansion failed: ") + cudaGetErrorString(err));
            return -1;
        }
        thresholds = rowThresholds;
    }

    // Decode (rows <= 8) is one call. Longer inputs go through in chunks of 8 rows: correct,
    // but each chunk streams the (thresholded) weights again, so prefill engines are better
    // built from the function-body graph (README.md).
    auto const* x = static_cast<char const*>(inputs[kX]);
    auto* y = static_cast<char*>(outputs[0]);
    for (int64_t r0 = 0; r0 < rows; r0 += CLADA_SPARSE_MLP_MAX_BATCH)
    {
        int32_t const n = static_cast<int32_t>(std::min<int64_t>(CLADA_SPARSE_MLP_MAX_BATCH, rows - r0));
        // TensorRT's workspace is scratch: the first call zero-fills it; every successful call
        // leaves it zero-filled again (sparse_mlp.h), so later chunks skip the memset.
        int32_t const workspaceIsZeroed = r0 > 0 ? 1 : 0;
        int const status = mGated
            ? clada_sparse_mlp(x + r0 * rowBytes, inputs[kWGate], inputs[kWUp], inputs[kWDown], thresholds + 2 * r0,
                y + r0 * rowBytes, n, hidden, inter, dtype, mActivation, ws, kernelWs, workspaceIsZeroed,
                /*config=*/nullptr, stream)
            : clada_sparse_mlp_plain(x + r0 * rowBytes, inputs[kWIn], inputs[kBIn], inputs[kWOut], inputs[kBOut],
                thresholds + 2 * r0, y + r0 * rowBytes, n, hidden, inter, dtype, mActivation, ws, kernelWs,
                workspaceIsZeroed, /*row_counts=*/nullptr, /*config=*/nullptr, stream);
        if (status != 0)
        {
            std::ostringstream s;
            s << (mGated ? "clada_sparse_mlp" : "clada_sparse_mlp_plain") << " failed (rows " << r0 << ".." << r0 + n << " of " << rows << ", hidden " << hidden
              << ", intermediate " << inter << "): " << clada_error_string(status);
            logError(s.str());
            return status;
        }
    }
    return 0;
}

IPluginV3* SparseMLPPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources: the workspace comes from TensorRT
}

PluginFieldCollection const* SparseMLPPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ================================================================== SparseMLPPluginCreator

SparseMLPPluginCreator::SparseMLPPluginCreator()
{
    mFieldNames.emplace_back(kActivationField, nullptr, PluginFieldType::kCHAR, 0);
    mFieldNames.emplace_back(kGatedField, nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFC.fields = mFieldNames.data();
}

char const* SparseMLPPluginCreator::getPluginName() const noexcept
{
    return kSparseMLPPluginName;
}

char const* SparseMLPPluginCreator::getPluginVersion() const noexcept
{
    return kSparseMLPPluginVersion;
}

char const* SparseMLPPluginCreator::getPluginNamespace() const noexcept
{
    return kSparseMLPPluginNamespace;
}

PluginFieldCollection const* SparseMLPPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* SparseMLPPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        // Compiled against sparse_mlp.h, but libclada_kernels.so is resolved at load time:
        // refuse a library of another C ABI version instead of calling into it.
        int const abi = clada_kernels_abi_version();
        if (abi != CLADA_KERNELS_ABI_VERSION)
        {
            logError("libclada_kernels has C ABI version " + std::to_string(abi) + ", this plugin was built for "
                + std::to_string(CLADA_KERNELS_ABI_VERSION) + "; build both from the same plugins/ tree");
            return nullptr;
        }
        int32_t activation = CLADA_ACT_SILU; // a node without the attribute: SwiGLU
        bool gated = true;                   // a node without the attribute: the gated form
        std::string const node = name ? name : "";
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr || f.data == nullptr)
            {
                continue;
            }
            if (std::strcmp(f.name, kGatedField) == 0)
            {
                int64_t value = -1;
                if (f.length != 1)
                {
                    value = -1;
                }
                else if (f.type == PluginFieldType::kINT32)
                {
                    value = *static_cast<int32_t const*>(f.data);
                }
                else if (f.type == PluginFieldType::kINT64)
                {
                    value = *static_cast<int64_t const*>(f.data);
                }
                else if (f.type == PluginFieldType::kINT8)
                {
                    value = *static_cast<int8_t const*>(f.data);
                }
                else if (f.type == PluginFieldType::kINT16)
                {
                    value = *static_cast<int16_t const*>(f.data);
                }
                if (value != 0 && value != 1)
                {
                    logError("node " + node + ": the gated field must be one integer, 1 (gated MLP) or 0 (plain MLP)");
                    return nullptr;
                }
                gated = value == 1;
                continue;
            }
            if (std::strcmp(f.name, kActivationField) != 0)
            {
                continue;
            }
            if (f.type == PluginFieldType::kCHAR)
            {
                auto const* chars = static_cast<char const*>(f.data);
                std::string const value(chars, strnlen(chars, static_cast<size_t>(std::max(f.length, 0))));
                activation = activationFromName(value);
                if (activation < 0)
                {
                    logError("node " + node + ": unknown activation \"" + value + "\" (supported: " + kActivationNames
                        + ")");
                    return nullptr;
                }
            }
            else if (f.type == PluginFieldType::kINT32 && f.length == 1)
            {
                activation = *static_cast<int32_t const*>(f.data); // a clada_act_t value
                if (activationName(activation) == nullptr)
                {
                    logError("unknown activation code " + std::to_string(activation));
                    return nullptr;
                }
            }
            else
            {
                logError("the activation field must be a string");
                return nullptr;
            }
        }
        return new SparseMLPPlugin(activation, gated);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace clada::trt
