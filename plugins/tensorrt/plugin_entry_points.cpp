// Entry points of a TensorRT plugin library (dynamic registration): what
// IPluginRegistry::loadLibrary, Python's trt.get_plugin_registry().load_library() and
// `trtexec --dynamicPlugins=` look up. They register the creators returned here, so this
// library registers nothing by itself when loaded (see plugin_static_registration.cpp for
// the variant that does). Uses no symbol of libnvinfer: the library does not link it.
#include "sparse_mlp_plugin.h"

#if defined(_WIN32)
#define CLADA_TRT_API __declspec(dllexport)
#else
#define CLADA_TRT_API __attribute__((visibility("default")))
#endif

extern "C" CLADA_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    clada::trt::setLoggerFinder(finder);
}

extern "C" CLADA_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static clada::trt::SparseMLPPluginCreator sparseMlpCreator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sparseMlpCreator};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
