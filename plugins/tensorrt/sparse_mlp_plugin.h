/*
 * TensorRT plugin for the ONNX node clada::SparseMLP (version 1): IPluginV3 and its creator.
 *
 * Inputs of the gated form (attribute gated = 1, the default; ONNX order, which the parser's
 * fallback plugin importer keeps):
 *   0 x          [B, T, H] (or any [..., H])  float16 | bfloat16
 *   1 w_gate_t   [H, I]                        same type as x (an initializer: a constant)
 *   2 w_up_t     [H, I]                        same type as x
 *   3 w_down_t   [I, H]                        same type as x
 *   4 thresholds [B, 2] float32                (t_in, t_mid) per sequence
 * Inputs of the plain form (gated = 0: GPT-2, OPT, GPT-NeoX; y = act(x_s W_in + b_in)_s W_out + b_out):
 *   0 x          [..., H]
 *   1 w_in_t     [H, I]                        same type as x
 *   2 b_in       [I]                           same type as x
 *   3 w_out_t    [I, H]                        same type as x
 *   4 b_out      [H]                           same type as x
 *   5 thresholds [B, 2] float32
 * Output:
 *   0 y          shape and type of x
 * Optional attributes: "activation" (string: silu | gelu_tanh | gelu | relu; default silu),
 * "gated" (int: 1 gated, 0 plain; default 1).
 *
 * The math is the project's CUDA kernels (plugins/kernels/sparse_mlp.h), which take at most
 * CLADA_SPARSE_MLP_MAX_BATCH rows per call: the plugin feeds them the B*T rows in chunks, so
 * it is correct for any shape and fast for decode (B*T <= 8). See README.md.
 */
#ifndef CLADA_TRT_SPARSE_MLP_PLUGIN_H_
#define CLADA_TRT_SPARSE_MLP_PLUGIN_H_

#include "NvInferRuntime.h"

#include <cstdint>
#include <string>
#include <vector>

namespace clada::trt
{

//! What the ONNX parser looks up: the node's op_type, its "plugin_version" attribute (default
//! "1") and its "plugin_namespace" attribute (default ""). The ONNX domain is not consulted.
constexpr char kSparseMLPPluginName[] = "SparseMLP";
constexpr char kSparseMLPPluginVersion[] = "1";
constexpr char kSparseMLPPluginNamespace[] = "";

//! Plugin fields (from the ONNX attributes of the same names, and in serialized engines).
constexpr char kActivationField[] = "activation";
constexpr char kGatedField[] = "gated";

class SparseMLPPlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Input positions of the gated form, in ONNX order.
    enum Input : int32_t
    {
        kX = 0,
        kWGate = 1,
        kWUp = 2,
        kWDown = 3,
        kThresholds = 4,
        kNbInputs = 5
    };
    //! Input positions of the plain form (gated = 0), in ONNX order.
    enum PlainInput : int32_t
    {
        kWIn = 1,
        kBIn = 2,
        kWOut = 3,
        kBOut = 4,
        kPlainThresholds = 5,
        kPlainNbInputs = 6
    };
    static constexpr int32_t kNbOutputs = 1;

    //! activation: a clada_act_t value (CLADA_ACT_SILU, ...); gated: false for the plain form.
    explicit SparseMLPPlugin(int32_t activation, bool gated = true);
    SparseMLPPlugin(SparseMLPPlugin const& other);
    SparseMLPPlugin& operator=(SparseMLPPlugin const&) = delete;
    ~SparseMLPPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFieldsToSerialize();
    //! 5 (gated) or 6 (plain).
    int32_t nbInputs() const noexcept
    {
        return mGated ? int32_t{kNbInputs} : int32_t{kPlainNbInputs};
    }
    //! Position of the thresholds input: 4 (gated) or 5 (plain).
    int32_t thresholdsIndex() const noexcept
    {
        return mGated ? int32_t{kThresholds} : int32_t{kPlainThresholds};
    }

    int32_t mActivation;
    bool mGated;
    int32_t mGatedField; // serialized as the "gated" field (kINT32)
    std::string mActivationName; // serialized as the "activation" field (kCHAR)
    std::string mTimingCacheId;
    std::string mMetadata;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class SparseMLPPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    SparseMLPPluginCreator();
    ~SparseMLPPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    //! Build phase: fields from the ONNX node's attributes; runtime phase: getFieldsToSerialize()'s.
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFC{};
};

//! Where the plugin's messages go: the logger TensorRT hands a plugin library through its
//! setLoggerFinder() entry point, or stderr for errors when there is none.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

} // namespace clada::trt

#endif // CLADA_TRT_SPARSE_MLP_PLUGIN_H_
