"""The generation service: Triton (TensorRT-LLM tensor contract) + `aligner.v1.Generation`."""
