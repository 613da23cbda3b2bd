# Sourced by the GPU machine's scripts (gpu-check.sh, gpu-profile.sh): puts the folders of
# cuBLAS / cuDNN / NCCL on the loader path for cudarc's dlopen (the image ships them as Python
# wheels: nvidia-cublas, nvidia-cudnn-cu13, ...), and keeps the path as it was in
# ORIG_LD_LIBRARY_PATH (PyTorch brings its own cuDNN and runs with that one).
ORIG_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
for lib in 'libcudnn.so.9*' 'libcublas.so.13*' 'libcublasLt.so.13*' 'libnccl.so.2*'; do
    for d in $(find /opt /usr/local /usr/lib /usr/lib64 -name "$lib" -printf '%h\n' 2>/dev/null | sort -u); do
        case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    done
done
export LD_LIBRARY_PATH ORIG_LD_LIBRARY_PATH
