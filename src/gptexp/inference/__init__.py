"""Running a trained model: the KV cache (kv_cache), sampling and the decode loop (generation), speculative
decoding (speculative), weight-only int8 / int4 layers (quantize) over gptexp's CPU kernels (kernels/), NF4 through
bitsandbytes (nf4) and a quantized model's decoding step in one C call (fused_step). It knows models only through
what they provide (`forward(idx, cache=...)`, `new_kv_cache`, `context_length`), never their classes."""
