#!/usr/bin/env bash
# Rebuilds datasets/fashion-mnist-small/{train,test} from the Debian package
# dataset-fashion-mnist (MIT licence): the first 1000 images of every class of the training
# set (10,000) and the first 200 of every class of the test set (2,000), PNG-encoded records.
# The result is deterministic (same package version -> same bytes).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update && apt-get install -y dataset-fashion-mnist
fi
# Where the package put the IDX files.
SRC=$(dirname "$(dpkg -L dataset-fashion-mnist | grep 'train-images-idx3-ubyte.gz$')")
export FASHION_MNIST_DIR="$SRC"
CLASSES="T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"

if cargo run --release --quiet --bin carp -- pack --help >/dev/null 2>&1; then
    for split in train:train:1000 test:t10k:200; do
        IFS=: read -r out prefix n <<<"$split"
        cargo run --release --quiet --bin carp -- pack "$SRC/$prefix-images-idx3-ubyte.gz" \
            --labels "$SRC/$prefix-labels-idx1-ubyte.gz" \
            --out "datasets/fashion-mnist-small/$out" \
            --per-class "$n" --idx-encoding png --shard-records 100000 \
            --class-names "$CLASSES"
    done
else
    # The same packing through the library (for builds whose CLI lacks `pack`).
    cargo test --release --test data_embedded -- --ignored rebuild_embedded_dataset --nocapture
fi
du -sh datasets/fashion-mnist-small/*
