"""Serving the experts: a real vLLM on the CPU (``vllm_cpu``)."""
