"""Tiny random transformers configs covering the supported Llama family variants."""

import transformers

_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama3_scaled_untied": transformers.LlamaConfig(
        **_SMALL, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama_gqa1": transformers.LlamaConfig(**_SMALL, num_key_value_heads=1),
    "llama_gqa2": transformers.LlamaConfig(**_SMALL, num_key_value_heads=2),
    "llama_gqa4_tied": transformers.LlamaConfig(**_SMALL, num_key_value_heads=4,
                                                tie_word_embeddings=True),
    "llama_head_dim_24": transformers.LlamaConfig(**_SMALL, num_key_value_heads=2, head_dim=24),
    "llama2_style": transformers.LlamaConfig(
        **_SMALL, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mistral": transformers.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=None),
    "qwen2_bias_tied": transformers.Qwen2Config(**_SMALL, num_key_value_heads=2,
                                                tie_word_embeddings=True),
}


def build(name: str, seed: int = 0):
    """The transformers model of a tiny config, with non-trivial random weights and biases."""
    import copy

    import torch

    config = copy.deepcopy(TINY_CONFIGS[name])  # tests may edit the model's config
    model_class = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM}[config.model_type]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; make them matter
        for name_, param in model.named_parameters():
            if name_.endswith("norm.weight") or name_.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model
