"""The model side: the LLM loader (hub id or local folder, ZeRO-3 streamed build), attention
kernels, the graph projector, the multimodal wrapper, vocabulary row blocks and export folders."""
