//! Data: the shard format, packing, decoding, two-view augmentation and the loader.
