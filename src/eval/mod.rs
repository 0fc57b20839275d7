//! Evaluation: k-NN classification and embeddings.
