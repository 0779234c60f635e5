"""Model-based scores for selection: answer losses (perplexity, IFD, EL2N, GRAPE), embeddings, and their cache."""
