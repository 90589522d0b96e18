"""Preference data: input formats, tokenizers, preprocessing into Megatron IndexedDatasets,
prompt embeddings, the dataset, samplers and collate."""
