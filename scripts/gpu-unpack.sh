# Sourced on the GPU machine by gpu-check.sh and gpu-profile.sh, from the repo root: unpacks the
# binaries that scripts/gpu-bundle.sh packed into gpu-bundle/bins.tar.xz (the device tool
# carries at most 64 MiB; they are ~110 MiB unpacked), once.
if [ ! -d gpu-bundle/tests ] && [ -f gpu-bundle/bins.tar.xz ]; then
    tar -xJf gpu-bundle/bins.tar.xz -C gpu-bundle 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            gpu-bundle/bins.tar.xz gpu-bundle ||
        echo "cannot unpack gpu-bundle/bins.tar.xz" >&2
fi
