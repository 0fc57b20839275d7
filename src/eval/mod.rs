//! Evaluation: k-NN classification of (teacher) features.

pub mod backbone;
pub mod embed;
pub mod features;
pub mod knn;

pub use features::{FeatureExtractor, Features, PatchMean};
pub use knn::{knn_classify, topk_accuracy, KnnPerK, KnnResult};
