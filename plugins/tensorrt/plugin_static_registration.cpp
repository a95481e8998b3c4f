// Static registration: registers the SparseMLP creator with TensorRT's global plugin registry
// when the library is loaded (dlopen, ctypes.CDLL, `trtexec --staticPlugins=`). Built into
// libclada_trt_plugin_static.so, never into libclada_trt_plugin.so: IPluginRegistry::loadLibrary
// refuses a library whose creators are already registered, so one library cannot offer both.
// Calls getPluginRegistry() from libnvinfer.
#include "sparse_mlp_plugin.h"

using clada::trt::SparseMLPPluginCreator;

REGISTER_TENSORRT_PLUGIN(SparseMLPPluginCreator);
