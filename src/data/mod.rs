//! The input side: folder scan, decoding, multi-crop augmentation, parallel loader, cache.
