"""Building blocks of the models: linear, embedding, normalisation, rotary embeddings, attention."""
