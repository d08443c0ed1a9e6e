"""The text model: Llama-3 preset, domain pretraining, LoRA SFT, GPTQ, evaluation."""
