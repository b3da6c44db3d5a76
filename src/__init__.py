"""Training and inference core of the trainable Llama-2-chat Cog container."""
