//! Evaluation: backbones loaded for evaluation ([`backbone`]), features on any backend
//! ([`features`], [`embed`]) and k-NN classification ([`knn`]).

pub mod backbone;
pub mod embed;
pub mod features;
pub mod knn;
pub mod probe;

pub use features::{FeatureExtractor, Features, PatchMean};
pub use knn::{knn_classify, topk_accuracy, KnnPerK, KnnResult};
