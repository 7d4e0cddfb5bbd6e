"""Training: base models and chat templates, models and tokenizers, DeepSpeed under torchrun, checkpoints, whether a
run fits, licences, quantization."""
