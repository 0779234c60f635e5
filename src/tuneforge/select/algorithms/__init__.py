"""Model-free selection algorithms: MinHash/LSH near-duplicates, k-means / k-center, facility location."""
