"""Generation with the CLADA controller in the loop: backends, sampler, generator, controller."""

# Every backend name the CLI offers, in the order `--backend` lists them; kept here so that
# building the CLI parser does not import torch. `backends.open_backend` opens each.
BACKENDS = ("onnxruntime", "torch", "cuda", "tensorrt")
